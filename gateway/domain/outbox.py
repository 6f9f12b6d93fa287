"""The outbox's owners: every message the relay takes out of the chamber belongs to one domain service, which
writes it (through its port to the wire format) on its first send and decides what the HIS's answer, or its
giving up, means. Prescriptions (their messages' subjects say so) go to the prescription service, every other
message (bookings, holds, cancellations, moves) to the booking service, which ignores what it does not own."""

from __future__ import annotations


class Outbox:
    """The relay's ``encode``/``on_answer``/``on_dead``, each passed to the service that owns the message."""

    def __init__(self, booking, prescribing):
        self.booking, self.prescribing = booking, prescribing

    def _owner(self, message):
        return self.prescribing if self.prescribing.owns(message) else self.booking

    def encode(self, tx, message) -> tuple[bytes, str, str]:
        return self._owner(message).encode(tx, message)

    def on_answer(self, tx, message, answer) -> None:
        self._owner(message).on_answer(tx, message, answer)

    def on_dead(self, tx, message, reason: str) -> None:
        self._owner(message).on_dead(tx, message, reason)
