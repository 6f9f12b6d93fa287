"""Fuzz harness: the MLLP framer (adapters/inner/framing.py), fed in random chunkings.

Input: byte 0 picks the size cap (1, 2, 3, 8, 16, 64, 300 bytes or 1 MiB) and the junk cap (none, 1, 4 or
64 bytes), bytes 1-2 the chunking (the whole stream at once, byte by byte, chunks of 1-8 bytes, or chunks of
any size), the rest is what a peer sends.

Invariant (anything else is a crash): fed in that chunking, with a FrameTooLarge caught and feeding resumed
as the MLLP listener could (and stopped at TooMuchJunk, where the listener closes), the framer gives exactly
what `model` — the module docstring's rules applied one byte at a time — gives for the whole stream:

* the same frames, in order (frames out == frames in, whatever the chunking), and FrameTooLarge for the same
  frames, in the same places, each carrying the frames completed before it and a ``head`` that is the first
  bytes of the oversize payload (at least ``min(cap + 1, 4096)`` of them, at most 4096);
* TooMuchJunk after the same frames, when the junk since the last frame (commit blocks do not count as
  frames there) first exceeds the junk cap;
* the same count of junk bytes, and the same state at the end (in a frame or not, bytes pending);
* no other exception.
"""

from __future__ import annotations

import random

import atheris

with atheris.instrument_imports(include=["adapters.inner.framing"]):
    from adapters.inner.framing import COMMIT_ACK, COMMIT_NAK, FrameTooLarge, MLLPFramer, TooMuchJunk

from tests.fuzz.campaign import main

CAPS = (1, 2, 3, 8, 16, 64, 300, 1 << 20)
JUNK_CAPS = (None, 1, 4, 64)
_SB, _EB, _CR = 0x0B, 0x1C, 0x0D
_HEAD = 4096


def model(stream: bytes, cap: int, junk_cap: int | None) -> tuple[list[tuple[str, bytes]], int, bool, int]:
    """(events, junk bytes, in a frame, bytes pending) by the documented rules, one byte at a time. Events
    are ``('frame', payload)``, ``('too large', first bytes of the payload, up to 4096)`` and, last, ``('too
    much junk', b'')``."""
    events: list[tuple[str, bytes]] = []
    junk = junk_run = 0
    state = "out"  # out | in | oversize
    payload = bytearray()
    oversize: tuple[int, bytearray] | None = None  # (event index, its payload so far) while discarding
    swallow_cr = False
    for b in stream:
        if swallow_cr:
            swallow_cr = False
            if b == _CR:
                continue
        if state == "oversize":
            if b == _SB:
                state, payload = "in", bytearray()
            elif b == _EB:
                state, swallow_cr = "out", True
            elif len(oversize[1]) < _HEAD:
                oversize[1].append(b)
            if state != "oversize":
                events[oversize[0]] = ("too large", bytes(oversize[1]))
            continue
        if state == "out":
            if b == _SB:
                state, payload = "in", bytearray()
                continue
            discarded = 1
        elif b == _SB:  # a new start inside a frame: the unfinished one (and its 0x0B) is junk
            discarded = len(payload) + 1
            payload = bytearray()
        elif b == _EB:
            events.append(("frame", bytes(payload)))
            if payload not in (COMMIT_ACK, COMMIT_NAK):
                junk_run = 0
            state, swallow_cr = "out", True
            continue
        else:
            payload.append(b)
            if len(payload) > cap:
                oversize = (len(events), payload[:_HEAD])
                events.append(("too large", bytes(oversize[1])))
                state = "oversize"
            continue
        junk += discarded
        junk_run += discarded
        if junk_cap is not None and junk_run > junk_cap:
            events.append(("too much junk", b""))
            break
    if state == "oversize":
        events[oversize[0]] = ("too large", bytes(oversize[1]))
    return events, junk, state == "in", len(payload) if state == "in" else 0


def chunks(stream: bytes, how: int) -> list[bytes]:
    """The stream cut as ``how`` says: once, byte by byte, 1-8 bytes or any size at random."""
    mode, rng = how % 4, random.Random(how)
    if mode == 0:
        return [stream]
    if mode == 1:
        return [stream[i:i + 1] for i in range(len(stream))]
    out, pos = [], 0
    while pos < len(stream):
        size = rng.randint(1, 8) if mode == 2 else rng.randint(1, len(stream) - pos)
        out.append(stream[pos:pos + size])
        pos += size
    return out


def check(data: bytes) -> None:
    if len(data) < 3:
        return
    cap, junk_cap = CAPS[data[0] % len(CAPS)], JUNK_CAPS[data[0] // len(CAPS) % len(JUNK_CAPS)]
    stream = data[3:]
    framer = MLLPFramer(max_size=cap, max_junk=junk_cap)
    events: list[tuple[str, bytes]] = []

    def feed(chunk: bytes) -> str:
        """'fed', 'too large' or 'closed' (TooMuchJunk: the listener closes)."""
        try:
            events.extend(("frame", f) for f in framer.feed(chunk))
        except FrameTooLarge as e:
            assert e.max_size == cap and e.size_so_far > cap, (e.size_so_far, e.max_size, cap)
            events.extend(("frame", f) for f in e.frames)
            events.append(("too large", e.head))
            return "too large"
        except TooMuchJunk as e:
            assert e.max_junk == junk_cap and e.junk_run > junk_cap, (e.junk_run, e.max_junk, junk_cap)
            events.extend(("frame", f) for f in e.frames)
            events.append(("too much junk", b""))
            return "closed"
        return "fed"

    outcome = "fed"
    for chunk in chunks(stream, int.from_bytes(data[1:3], "big")):
        outcome = feed(chunk)
        if outcome == "closed":
            break
    while outcome == "too large":  # what follows an oversize frame's end in that chunk comes with the next feed
        outcome = feed(b"")
    expected, junk, in_frame, pending = model(stream, cap, junk_cap)
    assert [kind for kind, _ in events] == [kind for kind, _ in expected], (events, expected)
    for (kind, got), (_, want) in zip(events, expected):
        if kind == "frame":
            assert got == want, (got, want)
        elif kind == "too large":  # the first bytes of the oversize payload: at least what made it oversize
            assert want.startswith(got) and len(got) >= min(cap + 1, _HEAD), (got, want)
    if events[-1:] != [("too much junk", b"")]:  # (after which the rest of the chunk is not looked at)
        assert (framer.junk_bytes, framer.in_frame, framer.pending) == (junk, in_frame, pending), \
            ((framer.junk_bytes, framer.in_frame, framer.pending), (junk, in_frame, pending))


if __name__ == "__main__":
    main(check)
