"""What makes two HL7 v2 messages one message: who sent it, its control id, and its content.

HL7 v2.5 chapter 2 gives MSH-10 (message control id) as the number "that uniquely identifies the message",
chosen by the sending system and echoed in MSA-2; it is unique per sender, so a message's identity is its
sender - MSH-3 (sending application) and MSH-4 (sending facility) - plus MSH-10 (`sender`). A sender that
gets no acknowledgement sends the message again under the same MSH-10.

Which header fields may a resend change and still be the same message (`same_message`)? Only **MSH-7's
time**: MSH-7 is "the date/time that the sending system created the message", and a sender that builds the
message again from its database (many HIS do, rather than keep the bytes) stamps it anew. Nothing else:

* MSH-7's **time zone** stays: chapter 2A (TM, TS) makes it the default zone of every time in the message
  that has none, so another zone is other content.
* MSH-13 (sequence number) is repeated on a retransmission by the sequence number protocol (2.10.1); MSH-8
  (security) has no defined use to refresh; MSH-9/11/12/15/16/18 say what the message is and how to answer
  it; MSH-5/6 where it goes. A resend that changes any of them is not one.

The comparison is of the texts (each decoded in its own charset), not of the bytes; with MSH-7 equal it is
byte equality in practice. Pure functions, no I/O.
"""

from __future__ import annotations

import re

from adapters.hl7.er7 import Message

__all__ = ["same_message", "sender"]

_ZONE = re.compile(r"[+-]\d{4}\Z")


def sender(message: Message) -> str:
    """MSH-3 and MSH-4 as sent (their wire text, escapes and components kept), joined by the message's field
    separator: ``'HIS|HOSPITAL'``. With MSH-10, the message's identity."""
    msh = message.msh
    return f"{msh.raw(3)}{message.encoding.field}{msh.raw(4)}"


def same_message(first: bytes, first_charset: str, resent: bytes, resent_charset: str) -> bool:
    """Whether ``resent`` (a message with the sender and MSH-10 of ``first``) is ``first`` sent again: the
    same text, MSH-7's time aside (its time zone included). Each is decoded in its own charset (the codec its
    reader used); both parsed before, so both start with an MSH segment."""
    if first == resent:
        return True
    try:
        return _without_msh7_time(first.decode(first_charset)) == _without_msh7_time(resent.decode(resent_charset))
    except (UnicodeDecodeError, LookupError):
        return False


def _without_msh7_time(text: str) -> str:
    """``text`` with MSH-7 reduced to its time zone (``''`` when it has none)."""
    fs, component = text[3], text[4]
    fields = text.split(fs, 7)  # 'MSH', MSH-2, MSH-3 .. MSH-6, MSH-7, the rest
    if len(fields) < 8:
        return text
    zone = _ZONE.search(fields[6].split(component, 1)[0])
    fields[6] = zone.group() if zone else ""
    return fs.join(fields)
