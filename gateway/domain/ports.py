"""The ports: typed interfaces through which the domain reaches what it must not know — a wire format, a gate's
protocol. The domain calls them with its own values; the adapters implement them and gateway/service.py wires
them in.

- `OrderWriter`: a prescription -> the order message of its pharmacy endpoint (HL7 v2 RDE^O11 / OMP^O09:
  ``adapters.maps.rde_order.PharmacyOrderWriter``); the inner gate's, used on a prescription's first send.
- `PrescriptionDocuments`: the documents the chamber keeps for those who read prescriptions (the FHIR
  MedicationRequests and MedicationDispenses the outer gate serves: ``adapters.maps.fhir_prescription.
  FhirPrescriptions``), written from the domain's decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from gateway.domain.prescriptions import Dispense, Prescription

__all__ = ["OrderWriter", "PrescriptionDocuments"]


class OrderWriter(Protocol):
    """Writes a prescription as the order its pharmacy endpoint takes."""

    @property
    def message_type(self) -> str:
        """The order's message type, as the chamber records it (``RDE^O11``)."""

    @property
    def charset(self) -> str:
        """The charset the order is written in (the endpoint's)."""

    def write(self, prescription: Prescription, *, control_id: str, now: datetime) -> bytes:
        """The order's bytes. ``control_id`` is its message control id (kept on every resend), ``now`` the
        hospital's local time (naive) of the first send."""


class PrescriptionDocuments(Protocol):
    """The documents the chamber keeps for readers of prescriptions, one per item and one per dispense, so that a
    read serves stored bytes (and a released item's signature stays valid). The domain decides what a document
    says — its status and why, the HIS's order number, the gateway's signature — and stores the text these
    methods return; it never reads that text."""

    def item(self, document: str, item_id: str, status: str, reason: str = "", his_order: str = "") -> str:
        """An item's document (as the platform sent it, or as stored) with the gateway's id, its status
        (on-hold, active, cancelled, completed), why (none: no reason shown) and the HIS's order number, if
        given, added."""

    def released(self, prescription: Prescription, ids: Sequence[str]) -> tuple[bytes, list[str]]:
        """A released prescription's payload (what it is kept as) and its items' documents, one per id."""

    def dispense(self, dispense: Dispense, dispense_id: str) -> str:
        """A dispense's document."""

    def is_signed(self, document: str) -> bool:
        """Whether an item's document carries the gateway's signature."""

    def signed(self, document: str, sign: Callable[[bytes], str]) -> str:
        """An item's document with the gateway's signature, ``sign(bytes to sign)``, added."""
