"""The chamber's two threads beside the reactor thread, and how a writer waits for the write lock.

- :class:`Committer`, the writer thread: a batch's COMMIT (the WAL write and its fsync) off the reactor
  thread when commits are pipelined, and BEGIN while another process (the split lock's other gate) holds
  the write lock, so the reactor thread never sleeps on a lock.
- :class:`Checkpointer`: copies the WAL back into the database file beside the reactor thread.

The engine (:mod:`gateway.chamber.engine`) decides what runs where; these know connections, not tables.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Callable

import structlog

if TYPE_CHECKING:
    from gateway.chamber.engine import _Batch

log = structlog.get_logger("gateway.chamber.threads")

#: how long a writer waits for the write lock another process holds (the split lock's other gate)
LOCK_WAIT = 5.0


def commit(conn: sqlite3.Connection) -> None:
    """The COMMIT of a batch: the WAL write and its fsync.  (A function of its own so tests can slow it down
    or make it fail.)"""
    conn.execute("COMMIT")


def busy(error: sqlite3.Error) -> bool:
    """Did SQLite refuse because another connection holds a lock?"""
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY or "locked" in str(error)


def begin_waiting(conn: sqlite3.Connection, timeout: float = LOCK_WAIT) -> None:
    """BEGIN IMMEDIATE on a connection that does not wait for locks itself (busy_timeout 0): retry every
    half millisecond while another process holds the write lock, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if not busy(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.0005)


class Committer:
    """The writer thread: runs each batch's COMMIT off the reactor thread, one batch at a time, and hands the
    batch back to the reactor thread (``callFromThread``) once COMMIT has returned.  It also waits for the
    write lock when another process holds it (BEGIN), so the reactor thread never sleeps on a lock."""

    def __init__(self, conn: sqlite3.Connection, reactor, on_done: Callable[["_Batch"], None]):
        self._conn = conn
        self._reactor = reactor
        self._on_done = on_done
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="chamber-commit", daemon=True)
        self._thread.start()

    def submit(self, batch: "_Batch") -> None:
        self._jobs.put(batch)

    def _run(self) -> None:
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            if batch.waiting_for_lock:
                try:
                    begin_waiting(self._conn)
                except Exception as e:  # noqa: BLE001 - the batch cannot begin: it fails
                    batch.error = e
            else:
                try:
                    commit(self._conn)
                except Exception as e:  # noqa: BLE001 - whatever it was, the batch is not on disk
                    batch.error = e
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
            batch.done.set()
            self._reactor.callFromThread(self._on_done, batch)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()


#: Copy the WAL back into the database file (a PASSIVE checkpoint) in the checkpoint thread, at most once per
#: this many seconds while anything is committed: the first commit after a checkpoint starts the wait, the
#: commits during it are copied together.  SQLite's default does it inside the COMMIT that takes the WAL past
#: 1,000 pages — on the reactor thread, with two more fsyncs: on the benchmark machine one commit in ~60 then
#: took 3-8 ms instead of ~0.4 ms (docs/benchmarks.md).  The thread's checkpoint runs beside the reactor and
#: never blocks it (PASSIVE takes no lock a writer or reader waits for).
CHECKPOINT_INTERVAL = 0.1
#: The writer connection's own (inline) checkpoint stays at SQLite's default size: when the WAL reaches it,
#: the thread has copied most of its pages already, so the inline one has little left to copy — and only after
#: a checkpoint on the writer's own thread does the next transaction start the WAL file over from its
#: beginning.  (Measured: a checkpoint every 16 commits with the inline one at 4,000 pages cost ~20% of the
#: MLLP ingest rate — the same hot pages copied and the file fsynced over and over, and a WAL that kept
#: growing, so that every fsync also wrote the file's new size.)
INLINE_CHECKPOINT_PAGES = 1000


class Checkpointer:
    """The checkpoint thread: its own connection, a PASSIVE checkpoint CHECKPOINT_INTERVAL after the first
    commit the reactor thread reports since the last one.  sqlite3 releases the GIL while SQLite copies pages
    and fsyncs, so this runs on the other core.  A failed checkpoint (disk full) loses nothing — the pages stay
    in the WAL — and is logged; the next commit starts another."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self._pending = False  # a checkpoint is due (set on the reactor thread, cleared by this one)
        self._wake = threading.Event()
        self._stopping = False
        self.runs = 0
        self._thread = threading.Thread(target=self._run, name="chamber-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A commit returned (called on the reactor thread): one flag test, unless a checkpoint is to be due."""
        if not self._pending:
            self._pending = True
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            self._wake.wait(CHECKPOINT_INTERVAL)  # (the commits of this while are copied together; stop() wakes it)
            self._wake.clear()
            if self._stopping:
                return
            self._pending = False  # a commit from now on asks for the next checkpoint
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.runs += 1
            except sqlite3.Error as e:
                log.warning("chamber.checkpoint.failed", error=str(e))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        try:
            self._conn.close()
        except sqlite3.Error:
            pass


