"""The inner gate's prescription side: what the HIS pharmacy sends and answers, read into the domain's values
before the domain decides (`gateway.domain.prescribing.PrescriptionService`, docs/prescriptions.md).

- :class:`PharmacyInbound` is what the MLLP handler (`adapters.inner.receiver.InnerGateHandler`) asks about an
  RDS^O13 (dispensing) or an RDE^O11 the HIS releases to outside pharmacies: it reads the message
  (`adapters.maps.rds_dispense`) at once — an `Hl7Error` naming segment and field when it cannot, which the
  handler answers with AE/AR — and returns what applies the `Dispense` values or the released `Prescription`
  inside the transaction that records the message.
- :func:`order_answer` reads the HIS's answer to a message the relay sent as an answer to a pharmacy order
  (ACK, RRE^O12, ORP^O10: `adapters.maps.rde_order.read_order_answer`) for `HisAnswer.order`; the relay hands
  the answer to the domain, which reads it only for a prescription's order.

The order itself is written by the domain through its `OrderWriter` port (`adapters.maps.rde_order`), wired
by gateway/service.py: nothing here writes HL7.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from adapters.hl7.er7 import Hl7Error, Message
from adapters.maps.rde_order import ANSWER_TYPES, read_order_answer
from adapters.maps.rds_dispense import dispenses_from_rds, released_prescription
from gateway.domain.inbound import Verdict
from gateway.domain.prescribing import PrescriptionService
from gateway.domain.prescriptions import OrderAnswer


class PharmacyInbound:
    """RDS^O13 and released RDE^O11 from the HIS pharmacy, for the prescription service."""

    def __init__(self, prescriptions: PrescriptionService, tz: ZoneInfo):
        self.prescriptions = prescriptions
        self.tz = tz  # the hospital's: a dispense's time handed over is kept in local time

    def decider(self, message: Message) -> Callable[[Any], Verdict]:
        """Read an RDS^O13 or a released RDE^O11 now (Hl7Error with its location if it cannot be read) and
        return what applies it inside the transaction that records the message."""
        rx = self.prescriptions
        if message.message_code == "RDS":
            dispenses = dispenses_from_rds(message, self.tz)
            return lambda tx: rx.apply_dispenses(tx, message.control_id, dispenses)
        if message.message_code == "RDE":
            prescription = released_prescription(message)
            return lambda tx: rx.apply_release(tx, prescription)
        raise Hl7Error(200, f"this gateway does not take {message.type_name} messages", segment="MSH", field=9)


def order_answer(message: Message) -> OrderAnswer | None:
    """The HIS's answer read as one to a pharmacy order; None when it cannot be read as one (an SRR answers a
    booking; an MSA-1 that is no acknowledgment code)."""
    if message.message_code not in ANSWER_TYPES:
        return None
    try:
        return read_order_answer(message)
    except Hl7Error:
        return None
