"""The ids the gateway issues: control ids (MSH-10) of the messages it sends, ids of the rows it creates
(appointments; prescriptions, their items and dispenses), the Slot ids platforms book by, and the subject
that ties an outbound message to its appointment.  Both gates use them; nothing here does I/O but reading
the OS's random source.
"""

from __future__ import annotations

import functools

import os
import re
import secrets
import threading
from datetime import datetime

_random_bytes = bytearray()  # from the OS in 4 KB draws (one getrandom() per ~400 ids, not one per id)
_random_lock = threading.Lock()


def _random_hex(n_bytes: int) -> str:
    global _random_bytes
    with _random_lock:
        if len(_random_bytes) < n_bytes:
            _random_bytes = bytearray(os.urandom(4096))
        chunk = _random_bytes[-n_bytes:]
        del _random_bytes[-n_bytes:]
    return chunk.hex()


def new_control_id() -> str:
    """MSH-10 for a message we send: assigned once, kept on every resend (ST, at most 20 characters):
    'G' and 19 random hex digits (from the OS's random source, as secrets.token_hex)."""
    return "G" + _random_hex(10)[:19]


def new_id(prefix: str) -> str:
    """The id of a row the gateway creates: ``prefix`` ('a' an appointment; 'p' a prescription, 'm' one of
    its items, 'd' a dispense) and 20 random hex digits."""
    return prefix + secrets.token_hex(10)


def new_appointment_id() -> str:
    return new_id("a")


def subject_of(appointment_id: str) -> str:
    """The subject of the outbound messages about an appointment (what the relay's answer is applied to)."""
    return f"appointment:{appointment_id}"


_SLOT_ID_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")


def fhir_id(text: str) -> str:
    """A FHIR id ([A-Za-z0-9.-]{1,64}) from an HIS identifier."""
    out = _SLOT_ID_UNSAFE.sub("-", text)[:64]
    return out or "-"


@functools.lru_cache(maxsize=4096)  # (every SIU names its slot: the HIS repeats the same ones)
def slot_id(schedule_id: str, start_local: datetime) -> str:
    """The gateway's Slot.id: '<schedule id>-<YYYYMMDDHHMM>' (docs/hl7-profile.md)."""
    return fhir_id(f"{schedule_id}-{start_local:%Y%m%d%H%M}")
