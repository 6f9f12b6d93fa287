"""The inner gate's way to the HIS: the relay's destination (:class:`HisDestination`).

One MLLP connection to a HIS endpoint, one message in flight: it returns the HIS's answer as a
:class:`~gateway.domain.model.HisAnswer`, and tells a message that never reached the HIS
(:class:`~gateway.relay.HisUnreachable`: not an attempt) from one the HIS did not answer properly
(:class:`~gateway.relay.DeliveryFailed`).  Both failures are the relay's own (gateway/relay.py), so the
relay never imports this adapter.
"""

from __future__ import annotations

from twisted.internet import defer

from adapters.hl7.ack import read_ack
from adapters.hl7.er7 import Hl7Error, Message
from adapters.inner.client import AckTimeout, PeerUnavailable
from adapters.inner.pharmacy import order_answer
from gateway.domain.model import HisAnswer
from gateway.relay import DeliveryFailed, HisUnreachable


def his_answer(message: Message) -> HisAnswer:
    """The HIS's answer (ACK, SRR, RRE^O12, ORP^O10) as the domain reads it."""
    code, _control_id, text = read_ack(message)
    sch = message.segment("SCH")
    return HisAnswer(code=code, text=text, his_appointment=(sch.get(2) or None) if sch is not None else None,
                     order=order_answer(message))


class HisDestination:
    """The relay's way to the HIS: one MLLP connection, one message in flight.  A send that never went out on
    a connection open to the HIS (refused, connect timeout, TLS handshake failed: ``PeerUnavailable`` not
    written) fails with HisUnreachable; a timeout, lost connection or unreadable answer after the message went
    out fails with DeliveryFailed (the relay counts those attempts)."""

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
        reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        if failure.check(PeerUnavailable) and not failure.value.written:
            raise HisUnreachable(reason)
        raise DeliveryFailed(reason)

    def close(self) -> defer.Deferred:
        return self.client.close()
