"""What may cross the lock: message types allowed in each direction (``inner.accept_types``,
``inner.his.send_types``).  A pattern is ``CODE^EVENT``, ``CODE^*`` or ``CODE`` (any event)."""

from __future__ import annotations


def type_allowed(type_name: str, patterns) -> bool:
    """Does ``type_name`` (``'SIU^S12'``, or just ``'ACK'``) match one of ``patterns``?"""
    code, _, event = type_name.partition("^")
    for pattern in patterns:
        p_code, _, p_event = pattern.partition("^")
        if p_code == code and (p_event in ("", "*") or p_event == event):
            return True
    return False
