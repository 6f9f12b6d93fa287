"""Strict validation with hl7apy, for peers whose messages must follow the standard's structure to the letter.

The hot path reads messages with our own ER7 reader (`adapters.hl7.er7`), which is tolerant: it needs only
MSH-9/10/12 and whatever fields the mapping reads. A peer configured ``validation: strict`` has each message
parsed by hl7apy at ``VALIDATION_LEVEL.STRICT`` and validated against its version's message structure
(required segments and fields, cardinalities, data types, table-free value formats). hl7apy costs ~7-30 ms
per message (see ../shared/DOMAIN.md), paid on the reactor thread: strict is for peers that ask for it, not
the default.

`strict_problem` turns hl7apy's first complaint into an `Hl7Error` the gate answers with:

=====================================================  ===============================================
hl7apy says                                            Hl7Error
=====================================================  ===============================================
``UnsupportedVersion``                                 203 at MSH-12
``Missing required child SIU_S12.SCH`` (a segment)     100 naming that segment
``Missing required child SCH.SCH_6`` (a field)         101 at SCH-6
a data type or value format error (``ValueError``,     102
``InvalidDataType``, ``InvalidDateFormat`` ...)
``MaxLengthReached``                                   102
anything else from hl7apy (structure)                  100
=====================================================  ===============================================

ERR-8 carries hl7apy's text (capped at 200 characters); it can quote the offending value, which goes back
only to the peer that sent it. Known limit: strict validation knows the standard's segments only, so a peer
that sends Z-segments should stay tolerant.
"""

from __future__ import annotations

import re

from adapters.hl7.er7 import Hl7Error, Message

__all__ = ["VALIDATION_MODES", "strict_problem"]

#: the values of a peer's ``validation`` option
VALIDATION_MODES = ("tolerant", "strict")

_MISSING = re.compile(r"Missing required child (\w+)\.(\w+?)(?:_(\d+))?\s*$")


def strict_problem(message: Message) -> Hl7Error | None:
    """None when hl7apy's strict parse and validation accept ``message``, else the problem as an
    `Hl7Error`."""
    from hl7apy import exceptions as hl7apy_errors  # imported on first use: only strict peers pay for it
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    text = message.raw.decode(message.charset, errors="replace")
    text = text.replace("\r\n", "\r") if "\r" in text else text.replace("\n", "\r")
    try:
        parse_message(text.strip("\r\n"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    except hl7apy_errors.UnsupportedVersion as e:
        return Hl7Error(203, _text(e), segment="MSH", field=12)
    except hl7apy_errors.ValidationError as e:
        return _validation_error(e)
    except hl7apy_errors.MaxLengthReached as e:
        return Hl7Error(102, _text(e))
    except (ValueError, hl7apy_errors.InvalidDataType, hl7apy_errors.InvalidDateFormat,
            hl7apy_errors.InvalidDateOffset, hl7apy_errors.InvalidMicrosecondsPrecision) as e:
        return Hl7Error(102, _text(e))
    except hl7apy_errors.HL7apyException as e:
        return Hl7Error(100, _text(e))
    return None


def _text(error: Exception) -> str:
    return f"strict validation (hl7apy): {str(error) or type(error).__name__}"[:200]


def _validation_error(error: Exception) -> Hl7Error:
    m = _MISSING.search(str(error))
    if m is None:
        return Hl7Error(102, _text(error))
    parent, child, number = m.groups()
    if number is not None and re.fullmatch(r"[A-Z0-9]{3}", parent):
        return Hl7Error(101, _text(error), segment=parent, field=int(number))
    if re.fullmatch(r"[A-Z0-9]{3}", child):
        return Hl7Error(100, _text(error), segment=child)
    return Hl7Error(100, _text(error))
