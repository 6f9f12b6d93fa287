"""Fault-injection toolkit for the chamber's fault tests (issue "The chamber keeps its promise").

- :mod:`tests.faults.proxy`: :class:`FaultProxy`, a loopback TCP proxy that delays, drops, black-holes,
  refuses or cuts connections (kernel netem is not available here).
- :mod:`tests.faults.disk`: :func:`small_filesystem` (a tiny tmpfs / loop-mounted ext4) and :func:`fill`
  (a full disk on demand); :class:`FaultUnavailable` when mounting is impossible.
- :mod:`tests.faults.process`: :func:`kill9`, :func:`rss_bytes`, :func:`wait_for_port`.
- :mod:`tests.faults.load`: a synchronous load driver for HIS SIU traffic and platform bookings.
"""

from tests.faults.disk import FaultUnavailable, fill, free_bytes, small_filesystem
from tests.faults.load import (
    book_slots,
    free_slot_ids,
    run_mixed,
    send_sius,
    siu_message,
    slot_id,
)
from tests.faults.process import (
    kill9,
    port_open,
    rss_bytes,
    wait_for_port,
    wait_for_port_closed,
)
from tests.faults.proxy import FaultProxy

__all__ = [
    "FaultProxy", "FaultUnavailable", "book_slots", "fill", "free_bytes", "free_slot_ids", "kill9",
    "port_open", "rss_bytes", "run_mixed", "send_sius", "siu_message", "slot_id", "small_filesystem",
    "wait_for_port", "wait_for_port_closed",
]
