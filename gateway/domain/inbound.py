"""What the inner gate does with a message from the HIS, once it has been framed and read.

The decision (accept, refuse, already have it) is made here; the adapter turns it into an ACK.  The ACK
is only built after the chamber transaction that recorded the message has committed.

- A message is known by its sender and control id (HL7: MSH-3/MSH-4 and MSH-10; a control id is unique
  per sender only). One already committed, resent with the same content (``same_message`` says what that
  is: for HL7, the same text but for MSH-7's time, `adapters.hl7.identity`): the first answer is given again
  and nothing is processed twice.
- The same sender and control id with other content: refused (AR) — a sender reusing control ids would
  otherwise lose a message silently.
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

from gateway.domain.slot_book import SlotBook

log = structlog.get_logger("gateway.domain.inbound")
_message_log: list = [None, None]  # [structlog's configuration it was bound under, the bound logger or None]


def _info_log():
    """The bound logger that writes the per-message line, or None when ``info`` is not written.  Bound once per
    logging configuration (a reload or a test that configures structlog again gets a new one): the lazy
    ``log`` proxy binds a new logger at every call (~5 µs), and a filtered call costs ~2 µs; this runs for every
    message."""
    config = structlog.get_config()
    key = (config["processors"], config["wrapper_class"], config["logger_factory"], config["context_class"])
    cached_key = _message_log[0]
    if cached_key is None or any(a is not b for a, b in zip(key, cached_key)):
        bound = log.bind()
        _message_log[:] = [key, bound if bound.is_enabled_for(logging.INFO) else None]
    return _message_log[1]


@dataclass(frozen=True)
class Received:
    """A message as the inner gate read it."""

    peer: str
    control_id: str
    type: str
    body: bytes
    charset: str
    sender: str  # who numbered it (HL7: MSH-3 and MSH-4 as sent); with control_id, the message's identity


@dataclass(frozen=True)
class Verdict:
    code: str  # AA | AE | AR
    text: str = ""
    duplicate: bool = False  # the same message was committed before: answered again, not applied again
    reused: bool = False  # the sender's control id was committed before with other content: refused, not stored


def z_segments_kept(notices, passed: bool) -> list:
    """The notices as the slot book takes them: with their Z-segments when the HIS endpoint passes them
    (``pass_z_segments``), else without (they stay in the message's raw copy)."""
    if passed or not any(n.z_segments for n in notices):
        return notices
    return [dataclasses.replace(n, z_segments=()) for n in notices]


def identical(first: bytes, _first_charset: str, resent: bytes, _resent_charset: str) -> bool:
    """The strictest ``same_message``: the same bytes."""
    return first == resent


class InboundService:
    """``same_message(first_body, first_charset, resent_body, resent_charset)`` says whether a message with a
    committed message's identity is that message sent again (the inner gate passes
    `adapters.hl7.identity.same_message`)."""

    def __init__(self, chamber, slot_book: SlotBook, z_segment_peers=frozenset(), *, same_message=identical):
        self.chamber = chamber
        self.slot_book = slot_book
        self.z_segment_peers = frozenset(z_segment_peers)  # HIS endpoints whose Z-segments are passed on
        self.same_message = same_message

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
        messages: `gateway.domain.prescribing`); fires with the Verdict after COMMIT."""
        return self._record(received, "delivered", decide)

    def refuse(self, received: Received, code: str, text: str) -> defer.Deferred:
        """Record a message we refuse (so it can be looked at and replayed); fires with the Verdict."""
        verdict = Verdict(code, text)
        return self._record(received, "refused", lambda tx: verdict, verdict)

    def _record(self, received: Received, state: str, decide, verdict: Verdict | None = None) -> defer.Deferred:
        """``decide(tx) -> Verdict`` applies the message.  When the verdict is known beforehand (``verdict``),
        the message goes in directly in its final state with both story lines, and the unique index on
        (sender, control id) finds a resend (no lookup before the insert)."""
        def work(tx):
            if verdict is not None:
                message_id = tx.add_message(
                    direction="inbound", peer=received.peer, sender=received.sender,
                    control_id=received.control_id, type=received.type, state=state, body=received.body,
                    charset=received.charset, answer_code=verdict.code, answer_text=verdict.text, if_new=True,
                    story=(("committed", "received from the HIS"),
                           (state, f"{verdict.code} {verdict.text}".strip())))
                if message_id is None:
                    return self._resent(tx, received)
                decide(tx)
                return verdict
            known = tx.message_by_control_id("inbound", received.peer, received.control_id, received.sender)
            if known is not None:
                return self._resent(tx, received, known)
            message_id = tx.add_message(direction="inbound", peer=received.peer, sender=received.sender,
                                        control_id=received.control_id, type=received.type, state="committed",
                                        body=received.body, charset=received.charset,
                                        detail="received from the HIS")
            decided = decide(tx)
            tx.set_message_state(message_id, state, answer_code=decided.code, answer_text=decided.text,
                                 detail=f"{decided.code} {decided.text}".strip())
            return decided

        return self.chamber.transact(work).addCallback(self._logged, received)

    def _resent(self, tx, received: Received, known=None) -> Verdict:
        """A sender's control id already committed: the first answer again, or AR for other content."""
        if known is None:
            known = tx.message_by_control_id("inbound", received.peer, received.control_id, received.sender)
        verdict = self._known(known, received)
        if verdict.reused:  # kept in the original's story, with a fingerprint of the newcomer
            digest = hashlib.sha256(received.body).hexdigest()[:16]
            tx.note(known.id, f"refused (AR) a different message with this control id, sha256 {digest}")
        return verdict

    def _known(self, known, received: Received) -> Verdict:
        if not self.same_message(known.body, known.charset, received.body, received.charset):
            return Verdict("AR", f"control id {received.control_id} was already used for a different message",
                           reused=True)
        return Verdict(known.answer_code or "AA", known.answer_text or "", duplicate=True)

    @staticmethod
    def _logged(verdict: Verdict, received: Received) -> Verdict:
        info = _info_log()
        if info is None:  # (one line per message: skipped cheaply at warning)
            return verdict
        info.info("inner.message", peer=received.peer, control_id=received.control_id, type=received.type,
                 ack=verdict.code, duplicate=verdict.duplicate)
        return verdict
