"""The backlog rule: new work for an HIS endpoint is refused while too much already waits for it.

Checked inside the transaction that would queue the work (a booking, a hold told to the HIS, a
prescription), on the chamber's count of that endpoint's undelivered messages, so concurrent requests are
counted exactly.  The outer gate answers :class:`Overloaded` with 503 and Retry-After.
"""

from __future__ import annotations


class Overloaded(Exception):
    """Too much is waiting for the HIS: new work is refused until the queue drains."""

    def __init__(self, text: str, retry_after: int):
        super().__init__(text)
        self.retry_after = retry_after


def check_backlog(tx, peer: str, limit: int, retry_after: int) -> None:
    """Refuse new work for ``peer`` (Overloaded: 503 + Retry-After) while ``limit`` or more messages wait for
    it; each HIS endpoint has its own count, so a stalled pharmacy does not stop bookings, nor the reverse."""
    backlog = tx.outbound_backlog(peer)
    if backlog >= limit:
        raise Overloaded(f"{backlog} messages are waiting for HIS endpoint {peer!r}; try again later", retry_after)
