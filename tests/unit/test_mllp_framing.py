"""Unit tests of MLLP framing (adapters.inner.framing): bytes <-> frames, junk, size cap."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.inner.framing import (
    END_BLOCK,
    START_BLOCK,
    FrameTooLarge,
    MLLPFramer,
    frame,
)

payload_bytes = st.binary(max_size=200).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


def feed_chunks(framer: MLLPFramer, stream: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    last = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        out.extend(framer.feed(stream[last:cut]))
        last = cut
    return out


def test_frame_wraps_payload():
    """frame() is 0x0B payload 0x1C 0x0D and refuses payloads that would corrupt the stream."""
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\x0d"
    assert START_BLOCK + b"a" + END_BLOCK == frame(b"a")
    for bad in (b"a\x0bb", b"a\x1cb"):
        with pytest.raises(ValueError):
            frame(bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(payload_bytes, max_size=8), st.data())
def test_split_anywhere_gives_same_payloads(payloads, data):
    """Any payloads, framed and concatenated, then cut at arbitrary points, come out whole and in order,
    with no junk and nothing pending."""
    stream = b"".join(frame(p) for p in payloads)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    framer = MLLPFramer(max_size=1000)
    assert feed_chunks(framer, stream, cuts) == payloads
    assert framer.junk_bytes == 0 and framer.pending == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(payload_bytes, min_size=1, max_size=4))
def test_one_byte_chunks(payloads):
    """Feeding one byte at a time yields exactly the same payloads (the 0x1C / 0x0D pair may be split)."""
    stream = b"".join(frame(p) for p in payloads)
    framer = MLLPFramer()
    out = []
    for i in range(len(stream)):
        out.extend(framer.feed(stream[i : i + 1]))
    assert out == payloads and framer.junk_bytes == 0


def test_many_frames_in_one_chunk():
    """One chunk holding many frames yields them all, in order."""
    payloads = [f"MSH|{i}".encode() for i in range(500)]
    assert MLLPFramer().feed(b"".join(frame(p) for p in payloads)) == payloads


def test_junk_between_frames_counted():
    """Bytes outside frames are discarded and counted; payloads are unaffected."""
    framer = MLLPFramer()
    out = framer.feed(b"xx" + frame(b"one") + b"\r\nyyy" + frame(b"two") + b"z")
    assert out == [b"one", b"two"]
    assert framer.junk_bytes == 2 + 2 + 3 + 1  # a stray CR LF after a frame is junk too


def test_start_byte_inside_frame_restarts_it():
    """A 0x0B inside a frame drops the unfinished frame (counted as junk, its 0x0B included) and starts a
    new one."""
    framer = MLLPFramer()
    assert framer.feed(b"\x0bhalf") == []
    assert framer.pending == 4
    assert framer.feed(b"-more\x0bwhole\x1c\x0d") == [b"whole"]
    assert framer.junk_bytes == 1 + len(b"half-more")


def test_end_without_cr_still_delivers():
    """A frame ended by 0x1C without the 0x0D is delivered; the next frame is read normally, and a late
    0x0D in the next chunk is swallowed, not counted as junk."""
    framer = MLLPFramer()
    assert framer.feed(b"\x0bA\x1c\x0bB\x1c") == [b"A", b"B"]
    assert framer.feed(b"\x0d\x0bC\x1c\x0d") == [b"C"]
    assert framer.junk_bytes == 0


def test_pending_counts_buffered_bytes():
    """pending reports the payload bytes buffered for the frame in progress."""
    framer = MLLPFramer()
    framer.feed(b"\x0babc")
    framer.feed(b"de")
    assert framer.pending == 5 and framer.in_frame
    framer.feed(b"\x1c\x0d")
    assert framer.pending == 0 and not framer.in_frame


def test_oversize_raises_early_without_buffering():
    """The frame in progress raises FrameTooLarge as soon as it exceeds max_size - long before its end -
    and nothing beyond the cap stays buffered; the exception keeps the frame's first bytes."""
    framer = MLLPFramer(max_size=100)
    framer.feed(b"\x0bMSH|^~\\&|A|B|C|D|2024||ADT^A01|CTRL1|P|2.5\r")
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(b"x" * 1000)
    assert 100 < info.value.size_so_far <= 1100
    assert info.value.head.startswith(b"MSH|^~\\&|A|B")
    assert framer.pending == 0
    # the rest of the oversize frame is skipped, the next frame is read normally
    assert framer.feed(b"y" * 10_000 + b"\x1c\x0d" + frame(b"next")) == [b"next"]


def test_oversize_exactly_at_limit_is_fine():
    """A payload of exactly max_size bytes is accepted; one more byte is not."""
    assert MLLPFramer(max_size=10).feed(frame(b"0123456789")) == [b"0123456789"]
    with pytest.raises(FrameTooLarge):
        MLLPFramer(max_size=10).feed(frame(b"0123456789A"))


def test_oversize_keeps_frames_completed_before_it():
    """Frames completed earlier in the same feed() are carried on the exception, and frames after the
    oversize one in the same chunk are returned by the next feed()."""
    framer = MLLPFramer(max_size=10)
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(frame(b"ok1") + frame(b"x" * 50) + frame(b"ok2"))
    assert info.value.frames == [b"ok1"]
    assert framer.feed(b"") == [b"ok2"]


def test_oversize_in_one_byte_chunks():
    """The cap also holds when the frame arrives one byte at a time."""
    framer = MLLPFramer(max_size=5)
    framer.feed(b"\x0b")
    for _ in range(5):
        framer.feed(b"a")
    with pytest.raises(FrameTooLarge) as info:
        framer.feed(b"a")
    assert info.value.size_so_far == 6


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_an_oversize_frame_abandoned_by_a_new_start_is_too_large_in_any_chunking(chunk):
    """Found by the fuzz campaign (tests/fuzz/fuzz_framer.py): a frame past the cap that a new 0x0B abandons
    raised FrameTooLarge when it came in small chunks, but was silently dropped as junk (no NAK, connection
    kept) when the cap, the 0x0B and what follows came in one chunk. Now it is too large in every chunking,
    and the frame after it is still read."""
    stream = b"\x0b" + b"x" * 20 + frame(b"next")
    framer = MLLPFramer(max_size=10)
    events = []
    for i in range(0, len(stream), chunk):
        try:
            events += framer.feed(stream[i:i + chunk])
        except FrameTooLarge as e:
            events += [*e.frames, ("too large", e.head)]
    events += framer.feed(b"")
    assert [e if isinstance(e, bytes) else e[0] for e in events] == ["too large", b"next"]
    head = events[0][1]
    assert head == b"x" * len(head) and 10 < len(head) <= 20
    assert framer.junk_bytes == 0


def test_linear_time_for_a_big_frame_in_small_chunks():
    """A 1 MiB frame fed in 1 KiB chunks is joined once, not re-scanned per chunk: it takes about as long
    as feeding it in one piece (a quadratic framer takes seconds here)."""
    payload = b"a" * (1 << 20)
    stream = frame(payload)
    framer = MLLPFramer(max_size=2 << 20)
    start = time.perf_counter()
    out = []
    for i in range(0, len(stream), 1024):
        out.extend(framer.feed(stream[i : i + 1024]))
    elapsed = time.perf_counter() - start
    assert out == [payload]
    assert elapsed < 0.5
