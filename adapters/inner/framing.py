"""MLLP framing: ``0x0B <payload> 0x1C 0x0D``, bytes <-> frames, nothing else (release 2's commit
acknowledgement blocks are frames too: see `COMMIT_ACK`).

`MLLPFramer` is an incremental decoder fed whatever the transport delivers (one byte, many frames, a frame
split anywhere). Choices:

* Bytes outside a frame are junk: discarded and counted in ``junk_bytes`` (the protocol logs the count,
  never the bytes), and in ``junk_run``, the junk since the last frame that was not a commit block.
* A start byte (0x0B) inside a frame means the sender gave up on the previous frame and started again: the
  unfinished frame (its 0x0B included) is dropped and counted as junk, and a new frame starts.
* Junk cap (``max_junk``, optional): as soon as ``junk_run`` exceeds it `TooMuchJunk` is raised, carrying
  the frames completed before it in the same `feed` call (``frames``). The rest of that chunk is dropped;
  the listener closes the connection (junk between two messages is a stray CR LF, not kilobytes).
* The end of a frame is 0x1C; the 0x0D that should follow is swallowed when it comes (even in the next
  chunk). A frame is delivered as soon as its 0x1C arrives, so a sender that forgets the 0x0D (or sends it
  late) is still answered; if something else follows the 0x1C it is simply outside any frame.
* Size cap: as soon as the frame in progress exceeds ``max_size`` payload bytes `FrameTooLarge` is raised
  and nothing beyond the cap is buffered (reference engines have no cap: a known out-of-memory hole), also
  when a start byte abandons it after the cap, so the answer never depends on how the bytes were chunked. The
  exception carries the frames completed earlier in the same `feed` call (``frames``) so none are lost,
  and the first bytes of the oversize frame (``head``) so the listener can salvage MSH-10 for its NAK.
  After raising, the framer discards the rest of that frame (not counted as junk) and resumes at the next
  frame; bytes after the oversize frame's end in the chunk that raised are kept and processed at the start
  of the next `feed`. (The listener closes the connection anyway; the sender's own limit may not.)
* Linear time: each byte is looked at a constant number of times (C-level ``bytes.find``); a frame in
  progress is kept as a list of chunks and joined once.
"""

from __future__ import annotations

__all__ = [
    "COMMIT_ACK",
    "COMMIT_ACK_BLOCK",
    "COMMIT_NAK",
    "COMMIT_NAK_BLOCK",
    "END_BLOCK",
    "START_BLOCK",
    "FrameTooLarge",
    "MLLPFramer",
    "TooMuchJunk",
    "frame",
]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"

#: MLLP release 2: the payload of a commit acknowledgement block ("committed to safe storage") and of a
#: negative commit acknowledgement block ("not stored: send it again"). On the wire a block is framed like
#: any content, ``<VT><ACK><FS><CR>`` / ``<VT><NAK><FS><CR>``, so `MLLPFramer` hands it over as a one-byte
#: payload and the protocols tell it from HL7 content.
COMMIT_ACK = b"\x06"
COMMIT_NAK = b"\x15"
COMMIT_ACK_BLOCK = START_BLOCK + COMMIT_ACK + END_BLOCK
COMMIT_NAK_BLOCK = START_BLOCK + COMMIT_NAK + END_BLOCK

_SB = 0x0B
_EB = 0x1C
_CR = 0x0D
_HEAD_BYTES = 4096


class FrameTooLarge(Exception):
    """The frame in progress exceeds the size limit.

    Attributes: ``size_so_far`` (payload bytes of that frame seen so far, > ``max_size``), ``max_size``,
    ``frames`` (payloads completed before it in the same `MLLPFramer.feed` call, in order) and ``head`` (up
    to the first 4096 bytes of the oversize payload)."""

    def __init__(self, size_so_far: int, max_size: int, frames: list[bytes] | None = None, head: bytes = b""):
        super().__init__(f"MLLP frame exceeds {max_size} bytes ({size_so_far} bytes so far)")
        self.size_so_far = size_so_far
        self.max_size = max_size
        self.frames = frames if frames is not None else []
        self.head = head


class TooMuchJunk(Exception):
    """More than ``max_junk`` bytes of junk since the last frame. Attributes: ``junk_run`` (the junk since
    that frame, > ``max_junk``), ``max_junk`` and ``frames`` (payloads completed before it in the same
    `MLLPFramer.feed` call, in order)."""

    def __init__(self, junk_run: int, max_junk: int, frames: list[bytes]):
        super().__init__(f"{junk_run} bytes outside MLLP frames since the last frame (at most {max_junk})")
        self.junk_run = junk_run
        self.max_junk = max_junk
        self.frames = frames


def frame(payload: bytes) -> bytes:
    """``0x0B payload 0x1C 0x0D``. Raises ValueError if the payload contains 0x0B or 0x1C (it would corrupt
    the stream; no HL7 text in any supported charset contains them)."""
    payload = bytes(payload)
    if b"\x0b" in payload or b"\x1c" in payload:
        raise ValueError("MLLP payload must not contain 0x0B or 0x1C")
    return START_BLOCK + payload + END_BLOCK


class MLLPFramer:
    """Incremental MLLP decoder. ``feed(data)`` returns the payloads completed by ``data``.

    Attributes: ``junk_bytes`` (total bytes discarded outside frames or in abandoned frames), ``junk_run``
    (those discarded since the last frame other than a commit block), ``pending`` (payload bytes buffered
    for the frame in progress), ``in_frame``.
    """

    def __init__(self, max_size: int = 1 << 20, max_junk: int | None = None):
        if max_size < 1 or (max_junk is not None and max_junk < 1):
            raise ValueError("max_size and max_junk must be positive")
        self.max_size = max_size
        self.max_junk = max_junk
        self.junk_bytes = 0
        self.junk_run = 0
        self.pending = 0
        self.in_frame = False
        self._chunks: list[bytes] = []
        self._swallow_cr = False  # the previous byte was a frame's 0x1C
        self._discarding = False  # inside an oversize frame, waiting for its end
        self._carry = b""  # bytes after an oversize frame's end, seen in the chunk that raised

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the payloads of frames it completed, in order. Raises `FrameTooLarge`
        and `TooMuchJunk` (see the module docstring)."""
        data = bytes(data)
        if self._carry:
            data = self._carry + data
            self._carry = b""
        out: list[bytes] = []
        n = len(data)
        pos = 0
        if self._swallow_cr and n:
            self._swallow_cr = False
            if data[0] == _CR:
                pos = 1
        while pos < n:
            if self._discarding:
                # rest of an oversize frame: skip to its end (or to a new start byte)
                e = data.find(b"\x1c", pos)
                s = data.find(b"\x0b", pos, n if e < 0 else e)
                if s >= 0:
                    self._discarding = False
                    pos = s
                    continue
                if e < 0:
                    return out
                self._discarding = False
                pos = e + 1
                if pos < n and data[pos] == _CR:
                    pos += 1
                elif pos == n:
                    self._swallow_cr = True
                continue
            if not self.in_frame:
                s = data.find(b"\x0b", pos)
                if s < 0:
                    self._discard(n - pos, out)
                    return out
                self._discard(s - pos, out)
                self.in_frame = True
                pos = s + 1
                continue
            # inside a frame: look for its end, and for a restart before the end
            e = data.find(b"\x1c", pos)
            stop = n if e < 0 else e
            s = data.find(b"\x0b", pos, stop)
            if s >= 0:
                if self.pending + (s - pos) <= self.max_size:
                    abandoned = self.pending + (s - pos) + 1  # the unfinished payload and its 0x0B
                    self._chunks = []
                    self.pending = 0
                    pos = s + 1
                    self._discard(abandoned, out)
                    continue
                stop = s  # past the cap before the restart: too large, whatever the chunking
            size = self.pending + (stop - pos)
            if size > self.max_size:
                head = self.head()
                if len(head) < _HEAD_BYTES:
                    head += data[pos : min(stop, pos + _HEAD_BYTES - len(head))]
                self._chunks = []
                self.pending = 0
                self.in_frame = False
                if s >= 0:  # a new frame starts in this chunk: keep it for the next feed
                    self._carry = data[s:]
                elif e < 0:
                    self._discarding = True  # the rest of this chunk belongs to the oversize frame
                else:  # its end is in this chunk: keep what follows for the next feed
                    self._carry = data[e + 1 :]
                    self._swallow_cr = True
                raise FrameTooLarge(size, self.max_size, out, head)
            if e < 0:
                if stop > pos:
                    self._chunks.append(data[pos:stop])
                    self.pending = size
                return out
            if self._chunks:
                self._chunks.append(data[pos:e])
                payload = b"".join(self._chunks)
                self._chunks = []
            else:
                payload = data[pos:e]
            out.append(payload)
            if payload != COMMIT_ACK and payload != COMMIT_NAK:
                self.junk_run = 0
            self.pending = 0
            self.in_frame = False
            pos = e + 1
            if pos < n:
                if data[pos] == _CR:
                    pos += 1
            else:
                self._swallow_cr = True
        return out

    def head(self) -> bytes:
        """Up to the first 4096 bytes of the frame in progress (enough to salvage its MSH-10)."""
        return b"".join(self._chunks[:_HEAD_BYTES])[:_HEAD_BYTES]  # <= 4096 chunks of >= 1 byte

    def _discard(self, count: int, frames: list[bytes]) -> None:
        """Count ``count`` bytes of junk; raise `TooMuchJunk` (with ``frames``, those completed so far in this
        feed) once the junk since the last frame exceeds ``max_junk``."""
        self.junk_bytes += count
        self.junk_run += count
        if self.max_junk is not None and self.junk_run > self.max_junk:
            run, self.junk_run = self.junk_run, 0
            raise TooMuchJunk(run, self.max_junk, frames)
