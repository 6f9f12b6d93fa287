#!/usr/bin/env python3
"""The Python bounds: a minimal asyncio MLLP server that ACKs each frame, with or without a durable store.

    python bench/bounds/durable_server.py --port 2575 --store group --db /tmp/x.sqlite3

Framing by ``bytes.find``, MSH-10 by one ``split('|')`` of the first segment, the ACK by string formatting
(MSA-2 = MSH-10). ``--store``:

- ``group``: every frame that arrived in one event-loop turn is INSERTed in one SQLite transaction (WAL,
  ``synchronous=FULL``: on disk when COMMIT returns) and only then ACKed — the durable bound;
- ``each``: one transaction (and fsync) per frame, then its ACK;
- ``none``: ACK at once, nothing stored — the Python socket bound.

Nothing else: no parsing beyond MSH-10, no validation, no duplicate check, no logging. What gatewayd does
on top of this (full ER7 read, SIU mapping, slot book updates, duplicate detection, message story rows,
enhanced-mode ACK building) is the price of being a gateway rather than a bound.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time

SB, END = b"\x0b", b"\x1c\x0d"


class Store:
    def __init__(self, path: str, mode: str):
        self.mode = mode
        self.conn = None
        if mode != "none":
            self.conn = sqlite3.connect(path, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, control_id TEXT,"
                              " body BLOB, received REAL)")
        self.pending: list[tuple[asyncio.Transport, bytes, bytes]] = []
        self.scheduled = False

    def commit(self, rows: list[tuple[str, bytes, float]]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        c.executemany("INSERT INTO messages (control_id, body, received) VALUES (?, ?, ?)", rows)
        c.execute("COMMIT")


def ack(control_id: bytes) -> bytes:
    now = time.strftime("%Y%m%d%H%M%S").encode()
    return (SB + b"MSH|^~\\&|BOUND|PY|||" + now + b"||ACK|A" + control_id[:19] + b"|P|2.5\rMSA|AA|" + control_id
            + b"\r" + END)


class Mllp(asyncio.Protocol):
    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop):
        self.store = store
        self.loop = loop
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(END)
            if end < 0:
                break
            frame, buf = buf[:end].lstrip(SB), buf[end + 2:]
            head = frame.split(b"\r", 1)[0].split(b"|")
            control_id = head[9] if len(head) > 9 and head[0] == b"MSH" else b""
            self.received(frame, control_id)
        self.buf = buf

    def received(self, frame: bytes, control_id: bytes) -> None:
        store = self.store
        if store.mode == "none":
            self.transport.write(ack(control_id))
        elif store.mode == "each":
            store.commit([(control_id.decode("latin-1"), frame, time.time())])
            self.transport.write(ack(control_id))
        else:
            store.pending.append((self.transport, frame, control_id))
            if not store.scheduled:
                store.scheduled = True
                self.loop.call_soon(flush, store)


def flush(store: Store) -> None:
    """Group commit: everything that arrived in this loop turn, one transaction, then the ACKs."""
    batch, store.pending, store.scheduled = store.pending, [], False
    now = time.time()
    store.commit([(cid.decode("latin-1"), frame, now) for _, frame, cid in batch])
    for transport, _, cid in batch:
        if not transport.is_closing():
            transport.write(ack(cid))


async def main(args) -> None:
    loop = asyncio.get_running_loop()
    store = Store(args.db, args.store)
    server = await loop.create_server(lambda: Mllp(store, loop), "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=2575)
    ap.add_argument("--store", choices=("group", "each", "none"), default="group")
    ap.add_argument("--db", default="bound.sqlite3")
    asyncio.run(main(ap.parse_args()))
