"""The inner gate's HL7 side: turns read HL7 messages into service calls and answers into ACKs.

- :class:`InnerGateHandler` is the MLLP listener's handler (HIS -> gateway).  It maps SIU to slot
  notices, hands them to :class:`gateway.inbound.InboundService`, and builds the ACK from the verdict
  only after the chamber has committed.  Failure paths, chosen on purpose:

  ======================================  =====  ==========================================
  what                                    ACK    ERR
  ======================================  =====  ==========================================
  committed (or a duplicate of one)       AA     --
  message type or event we do not take    AR     200 / 201 at MSH-9
  SIU whose fields the slot book needs    AE     the segment and field (101/102/103)
  are missing or malformed
  control id reused with other content    AR     207 at MSH-10
  the chamber could not commit            AE     207 "not stored; send again"
  ======================================  =====  ==========================================

  Frames that do not parse at all are NAKed (AR) by the MLLP server before they reach the handler.

- :class:`HisDestination` is the relay's destination: an MLLP client to the HIS that returns the HIS's
  answer as a :class:`~gateway.scheduling.HisAnswer`.
- :class:`SlotPoller` asks the HIS for its slot book with SQM^S25 (``slot_source: poll``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import structlog
from twisted.application import service
from twisted.internet import defer

from adapters.hl7.ack import build_ack, read_ack
from adapters.hl7.er7 import Hl7Error, Message
from adapters.mapping.siu_slot import notices_from_siu, notices_from_sqr
from adapters.mllp.client import AckTimeout, PeerUnavailable
from gateway.booking import new_control_id
from gateway.errors import ChamberWriteError
from gateway.inbound import Received
from gateway.relay import DeliveryFailed
from gateway.scheduling import HisAnswer

log = structlog.get_logger("gateway.inner")


class InnerGateHandler:
    """MLLP handler for messages the HIS sends us."""

    def __init__(self, inbound, *, peer: str, sending_application: str, sending_facility: str, tz: ZoneInfo,
                 clock):
        self.inbound = inbound
        self.peer = peer
        self.sending_application = sending_application
        self.sending_facility = sending_facility
        self.tz = tz
        self.clock = clock

    def handle(self, message: Message, peer: str) -> defer.Deferred:
        received = Received(peer=self.peer, control_id=message.control_id, type=message.type_name,
                            body=message.raw, charset=message.charset)
        if message.message_code != "SIU":
            d = self._refuse(message, received, Hl7Error(
                200, f"this gateway does not take {message.type_name} messages", segment="MSH", field=9))
        else:
            try:
                notices = notices_from_siu(message)
            except Hl7Error as e:
                d = self._refuse(message, received, e)
            else:
                d = self.inbound.accept(received, notices).addCallback(self._verdict, message)
        return d.addErrback(self._not_stored, message)

    def _refuse(self, message: Message, received: Received, err: Hl7Error) -> defer.Deferred:
        code = "AR" if err.code in (200, 201, 203) else "AE"
        d = self.inbound.refuse(received, code, str(err))
        return d.addCallback(lambda v: self._ack(message, v.code, v.text, err))

    def _verdict(self, verdict, message: Message) -> bytes:
        error = None
        if verdict.code != "AA":
            error = Hl7Error(207, verdict.text, segment="MSH", field=10)
        return self._ack(message, verdict.code, verdict.text, error)

    def _not_stored(self, failure, message: Message) -> bytes:
        failure.trap(ChamberWriteError)
        log.error("inner.not_stored", control_id=message.control_id, error=failure.getErrorMessage())
        err = Hl7Error(207, "the gateway could not store the message; send it again")
        return self._ack(message, "AE", err.text, err)

    def _ack(self, message: Message, code: str, text: str, error: Hl7Error | None) -> bytes:
        return build_ack(
            message, code, sending_application=self.sending_application, sending_facility=self.sending_facility,
            control_id=new_control_id(), now=datetime.fromtimestamp(self.clock.seconds(), self.tz).replace(tzinfo=None),
            text=text if code != "AA" else "", error=error,
        )


def slot_notices(message: Message):
    """What the inner gate takes from the HIS, as slot notices; Hl7Error (with location) otherwise."""
    if message.message_code != "SIU":
        raise Hl7Error(200, f"this gateway does not take {message.type_name} messages", segment="MSH", field=9)
    return notices_from_siu(message)


def nak_code(err: Hl7Error) -> str:
    """AR for what the HIS must not send again as it is (type, event, version); AE for content errors."""
    return "AR" if err.code in (200, 201, 203) else "AE"


def make_reprocessor(slot_book, default_charset: str):
    """For ``gatewayd queue retry`` of a refused inbound message: read its raw bytes again with the current
    code and apply them (inside the caller's transaction).  Returns (ACK code, text) as the gate would."""
    from adapters.hl7.er7 import parse

    def reprocess(tx, message_row) -> tuple[str, str]:
        try:
            notices = slot_notices(parse(message_row.body, default_charset=default_charset))
        except Hl7Error as e:
            return nak_code(e), str(e)
        touched = slot_book.apply(tx, notices)
        return "AA", f"{len(touched)} slot(s) updated"

    return reprocess


def his_answer(message: Message) -> HisAnswer:
    """The HIS's answer (ACK, SRR) as the booking service reads it."""
    code, _control_id, text = read_ack(message)
    sch = message.segment("SCH")
    return HisAnswer(code=code, text=text, his_appointment=(sch.get(2) or None) if sch is not None else None)


class HisDestination:
    """The relay's way to the HIS: one MLLP connection, one message in flight."""

    def __init__(self, client):
        self.client = client

    def deliver(self, body: bytes, control_id: str, timeout: float) -> defer.Deferred:
        d = self.client.send(body, control_id, timeout)
        d.addCallback(his_answer)
        d.addErrback(self._failed)
        return d

    @staticmethod
    def _failed(failure):
        failure.trap(AckTimeout, PeerUnavailable, Hl7Error)
        raise DeliveryFailed(f"{failure.type.__name__}: {failure.getErrorMessage()}")

    def close(self) -> defer.Deferred:
        return self.client.close()


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
                            body=answer.raw, charset=answer.charset)
        yield self.inbound.accept(received, notices)
        self.polls += 1
        log.info("poller.applied", peer=self.peer, control_id=control_id, slots=len(notices))
        return True
