"""TCP details both gates share: TCP_NODELAY on a connection, and how a peer's address is named in logs.

Both gates' connections (the MLLP listener and client, the outer gate's HTTPS) use these, so they live here
rather than in either gate: the outer gate must not import the inner gate (.importlinter).
"""

from __future__ import annotations


def no_delay(transport) -> None:
    """Frames are small and answered one by one: without TCP_NODELAY, Nagle's algorithm meets the
    peer's delayed ACK and each exchange can stall ~40 ms."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def peer_name(address: object) -> str:
    """``host:port`` for IP addresses, ``str(address)`` otherwise."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
