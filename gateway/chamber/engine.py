"""The chamber: the durable store between the two gates of the lock.

A message enters through one gate, is committed here, and only then leaves by the other gate.  Nothing
is answered (HL7 ACK, HTTP status) before the transaction that recorded it has committed.

Design:

- Where the tables live is the chamber's backend (``backends.py``; docs/chamber.md): by default one SQLite file
  in WAL mode with ``synchronous=FULL`` (a commit is on disk when COMMIT returns), or PostgreSQL
  (``postgresql.py``).  What is written below of connections and threads is SQLite's; on PostgreSQL a batch
  runs on the reactor thread on the writer connection, and reads use a read-only connection of their own.
- Writes go through :meth:`Chamber.transact`: the work function is queued and all work queued in one
  reactor turn runs in a single transaction (group commit), each function inside its own SAVEPOINT so a
  function that raises undoes only its own writes.  The returned Deferred fires with the function's
  result (or its exception) only after COMMIT has returned.  A failed COMMIT fails every function of the
  batch: nothing is acknowledged that is not on disk.
- Reads (:meth:`Chamber.read`) see committed state only.
- SQL lives in this package only: services compose the primitives of :class:`~gateway.chamber.txn.Txn` and
  :class:`~gateway.chamber.reader.Reader` and make the decisions.

The package: this module (open, group commit, reads, observers, backup); ``upgrades.py`` (the versioned
schema in ``schema/``: a new chamber's tables, an older one's upgrades); ``rows.py`` (the row types),
``txn.py`` (what a unit of work may do), ``reader.py`` (reads of committed state), ``threads.py`` (the
writer and checkpoint threads), ``watch.py`` (another process's commits), ``errors.py``, ``retention.py``;
``backends.py``, ``postgresql.py`` and ``dialects.py`` (the backends and the SQL that differs between them).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import structlog
from twisted.internet import defer

from gateway.chamber import threads, upgrades
from gateway.chamber.backends import SqliteBackend
from gateway.chamber.errors import ChamberError, ChamberWriteError
from gateway.chamber.reader import Reader
from gateway.chamber.txn import Txn
from gateway.chamber.watch import CommitWatch

log = structlog.get_logger("gateway.chamber.engine")

T = TypeVar("T")

#: schedules remembered as committed (their fields), so an SIU that repeats them writes nothing; bounded
_KNOWN_SCHEDULES_MAX = 10_000


#: COMMIT in the writer thread (pipelined group commit) by default?  Measured on the 2-core benchmark machine
#: (docs/benchmarks.md), it costs more than it gives: each hand-over to the thread and back is ~80 µs of
#: CPU (thread switches on that VM), and with two batches in flight the load splits into smaller batches
#: (more commits, each writing its pages to the WAL again) — -10% MLLP ingest, higher booking p99 at
#: 200/s; only bookings at saturation with ordering by patient gained (+10-20%).  So off by default; the
#: writer thread still waits for the other gate's write lock (split lock) off the reactor thread.
PIPELINE_COMMITS = False


class _Batch:
    """The units of one transaction and what became of them (and, while it is in flight, of its COMMIT)."""

    __slots__ = ("units", "results", "failures", "settled", "schedules", "queue_changed", "needs_commit", "error",
                 "done", "waiting_for_lock")

    def __init__(self, units: list):
        self.units = units  # [(work, Deferred or None)]
        self.results: list = []
        self.failures: list = []
        self.settled: list[str] = []  # appointments whose pending change the batch cleared
        self.schedules: dict = {}  # schedules the batch wrote: id -> fields
        self.queue_changed = False  # it queued an outbound message or changed a message's state
        self.needs_commit = False  # BEGIN ran and at least one unit's writes are kept
        self.error: Exception | None = None  # the COMMIT failed
        self.done: threading.Event | None = None  # in flight: set when COMMIT (or its ROLLBACK) has returned
        self.waiting_for_lock = False  # in flight: the writer thread waits for BEGIN (another process's lock)


class Chamber:
    """The durable store.  Open with :meth:`open`; write with :meth:`transact`; read with :meth:`read`.

    With a reactor that runs threads (the real one) the chamber has a writer thread and two connections:

    - Reads (:meth:`read`) use a read-only connection of their own, which sees committed state only (WAL: a
      commit becomes visible once its fsync is done) and never waits for a writer.
    - The units of a batch run on the reactor thread inside BEGIN ... (so they see and decide on the
      current state).  If the other gate's process holds the write lock (split lock), the writer thread
      waits for it (BEGIN), not the reactor thread, which goes on reading and answering meanwhile.
    - Pipelined group commit (``pipeline``, default ``PIPELINE_COMMITS``): the reactor hands each batch's
      COMMIT — the WAL write and its fsync — to the writer thread and goes on reading, parsing and
      answering; what arrives meanwhile is queued and becomes the next batch, which starts when that COMMIT
      has returned.  Off by default (see PIPELINE_COMMITS for why); without it COMMIT runs on the reactor
      thread as before.

    Either way the units' Deferreds fire, and the observers run, on the reactor thread after COMMIT has
    returned; a failed COMMIT fails every unit of its batch; :meth:`close` waits for a COMMIT in flight.
    Without such a reactor (tests with a Clock, the CLI) or for ``:memory:``, one connection does everything,
    synchronously.  ``commit_in_thread`` forces either way (None: decide as above)."""

    def __init__(self, path: str | Path | None = None, *, clock: Callable[[], float], reactor=None,
                 commit_in_thread: bool | None = None, pipeline: bool | None = None, backend=None):
        if (path is None) == (backend is None):
            raise TypeError("Chamber: give either the SQLite file's path or a backend")
        #: where the tables live (gateway/chamber/backends.py): the SQLite file at ``path`` unless given
        self.backend = backend if backend is not None else SqliteBackend(path)
        self._errors = self.backend.Error  # (the backend's error class: what a failed statement raises)
        self.path = self.backend.target  # the SQLite file; for PostgreSQL where it is (never a password)
        self._reactor = reactor
        self._clock = clock
        self._commit_in_thread = commit_in_thread
        self.pipeline = pipeline  # COMMIT in the writer thread?  None: PIPELINE_COMMITS (read at each commit)
        self._writer: sqlite3.Connection | None = None  # transactions (and the units' reads)
        self._reader: sqlite3.Connection | None = None  # reads of committed state (the writer, if not threaded)
        self._committer: threads.Committer | None = None
        self._checkpointer: threads.Checkpointer | None = None
        self._inflight: _Batch | None = None  # the batch whose COMMIT runs in the writer thread
        self._closing = False
        self._queue: list[tuple[Callable[[Txn], Any], defer.Deferred]] = []
        self._flush_call = None
        self._observers: list[tuple[Callable[[], None], bool]] = []  # (callback, also after own commits)
        self._settled_observers: list[Callable[[list[str]], None]] = []
        self._unit_hooks: list[Callable[[Txn], None]] = []  # run at the end of each unit, inside it (on_unit)
        self._known_schedules: dict[str, tuple] = {}  # committed schedules' fields (see Txn.upsert_schedule)
        self._known_topics: set[str] | None = None  # topics with an active subscription (Txn.subscribed_topics)
        self._version_checked = False  # data_version checked in this transaction
        self._seen_version: int | None = None  # data_version when the last batch began (other writers?)
        self._watch: CommitWatch | None = None  # another process's commits (split lock): see watch()

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The connection outside code may look at (pragmas; the admin health probe's BEGIN IMMEDIATE +
        ROLLBACK): the read connection, never the writer's, which may be inside a batch or in its COMMIT."""
        return self._reader

    # -- lifecycle -----------------------------------------------------------------------------------------
    def open(self) -> None:
        backend = self.backend
        try:
            conn = backend.connect()
            self._writer = self._reader = conn
            mode = backend.prepare(conn)
            backend.check_integrity(conn)
            backend.ensure_schema(conn, self._clock)
            if backend.kind == "sqlite" and self._threaded(mode):
                self._reader = backend.connect_reader()
                conn.execute("PRAGMA busy_timeout = 0")  # lock waits happen in the writer thread, not here
                self._committer = threads.Committer(conn, self._reactor, self._committed)
                self._checkpointer = threads.Checkpointer(backend.connect())
                conn.execute(f"PRAGMA wal_autocheckpoint = {threads.INLINE_CHECKPOINT_PAGES}")
            elif backend.kind != "sqlite":  # reads on a connection of their own, which cannot write
                self._reader = backend.connect_reader()
        except ChamberError:
            self._close_quietly()
            raise
        except self._errors as e:
            self._close_quietly()
            raise backend.opened_error(e) from e
        self._known_schedules.clear()
        self._known_topics = None
        self._seen_version = None
        log.info("chamber.opened", path=self.path, backend=self.backend.kind, journal_mode=mode,
                 schema_version=upgrades.SCHEMA_VERSION, commit_thread=self._committer is not None)

    def _threaded(self, journal_mode: str) -> bool:
        """COMMIT in a writer thread?  Only on a WAL file (readers beside the writer), with a reactor that can
        take calls from threads."""
        if self._commit_in_thread is False or self.path == ":memory:" or journal_mode.lower() != "wal":
            return False
        if self._commit_in_thread:
            return True
        from twisted.internet.interfaces import IReactorThreads

        return self._reactor is not None and IReactorThreads.providedBy(self._reactor)

    def _close_quietly(self) -> None:
        if self._committer is not None:
            self._committer.stop()
            self._committer = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        for conn in {id(c): c for c in (self._reader, self._writer) if c is not None}.values():
            try:
                conn.close()
            except self._errors:
                pass
        self._writer = self._reader = None

    def backup(self, dest: str | Path) -> dict[str, int]:
        """Write a consistent copy of the chamber to ``dest`` — safe while gatewayd runs (SQLite's online
        backup in one step: a read transaction, which in WAL mode holds up no writer) — and return its row
        counts.  The copy is written beside ``dest`` first, readable by its owner only (it holds patient
        data), checked with ``integrity_check``, flushed to disk and then renamed into place, so ``dest`` is
        either the old file or a whole new copy, never half of one."""
        if self._reader is None:
            raise ChamberError("the chamber is closed")
        return self.backend.backup(self._reader, dest, lambda conn: Reader(conn, self._clock()).counts())

    def close(self) -> None:
        """Wait for a COMMIT in flight (its units are answered), commit what is still queued, then close."""
        if self._writer is None:
            return
        self._closing = True  # from here on, batches commit on this thread
        try:
            if self._flush_call is not None and self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
            self._settle_inflight()
            for _ in range(100):  # what the answered units' callbacks queue is committed too (bounded)
                if not self._queue:
                    break
                self._flush()
            leftover, self._queue = self._queue, []
            for _, d in leftover:
                d.errback(ChamberError("the chamber is closed"))
            self._close_quietly()
        finally:
            self._closing = False
        log.info("chamber.closed", path=self.path)

    # -- writing -------------------------------------------------------------------------------------------
    def transact(self, work: Callable[[Txn], T]) -> defer.Deferred:
        """Queue ``work`` for the next transaction; fires with its result after that COMMIT has returned."""
        if self._writer is None:
            return defer.fail(ChamberError("the chamber is closed"))
        d: defer.Deferred = defer.Deferred()
        self._queue.append((work, d))
        if self._reactor is None:
            self._flush()
        elif self._flush_call is None and self._inflight is None:  # (a COMMIT in flight flushes when it returns)
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    def transact_now(self, work: Callable[[Txn], T]) -> T:
        """Run ``work`` in its own committed transaction, synchronously (CLI tools, start-up)."""
        if self._writer is None:
            raise ChamberError("the chamber is closed")
        self._settle_inflight()
        batch = self._run_batch([(work, None)], wait_for_lock=True)
        if batch.needs_commit:
            self._commit_here(batch)
        self._finish(batch)
        if batch.failures[0] is not None:
            raise batch.failures[0]
        return batch.results[0]

    def _flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if self._inflight is not None or not self._queue or self._writer is None:
            return
        units, self._queue = self._queue, []
        threaded = self._committer is not None and not self._closing
        batch = self._run_batch(units, wait_for_lock=not threaded)
        if batch.waiting_for_lock:  # another process holds the write lock: the writer thread waits for it
            self._send_to_writer(batch)
            return
        self._commit_batch(batch)

    def _commit_batch(self, batch: _Batch) -> None:
        if batch.needs_commit:
            if self._committer is not None and not self._closing and self._pipelining():
                self._send_to_writer(batch)  # -> _committed, on this thread, after COMMIT returned
                return
            self._commit_here(batch)
        self._finish(batch)

    def _pipelining(self) -> bool:
        """COMMIT in the writer thread (see PIPELINE_COMMITS)?"""
        return PIPELINE_COMMITS if self.pipeline is None else self.pipeline

    def _send_to_writer(self, batch: _Batch) -> None:
        batch.done = threading.Event()
        self._inflight = batch
        self._committer.submit(batch)

    def _committed(self, batch: _Batch) -> None:
        """The writer thread's COMMIT of ``batch`` has returned — or its BEGIN, after waiting for another
        process's lock (called on the reactor thread)."""
        if batch is not self._inflight:
            return  # close() or transact_now() waited for it and finished it already
        self._inflight = None
        if batch.waiting_for_lock:
            self._begun(batch)
            return
        self._finish(batch)
        if self._queue:
            self._flush()  # what arrived during the COMMIT: the next batch

    def _begun(self, batch: _Batch) -> None:
        """The writer thread has the write lock for ``batch`` (BEGIN done), or gave up: run its units."""
        batch.waiting_for_lock = False
        if batch.error is not None:
            error, batch.error = batch.error, None
            self._abort_batch(batch, error, rolled_back=True)
            self._finish(batch)
            if self._queue and self._inflight is None:
                self._flush()
            return
        batch.done = None
        batch = self._run_batch(batch.units, begun=True)
        self._commit_batch(batch)
        if self._inflight is None and self._queue:
            self._flush()

    def _settle_inflight(self) -> None:
        """Wait (blocking) for a COMMIT in flight and finish its batch here: the writer connection is free
        afterwards, and what that batch did is known before anything else runs."""
        batch = self._inflight
        if batch is None:
            return
        batch.done.wait()
        self._inflight = None
        if batch.waiting_for_lock:  # the writer thread waited for the lock: the units run here, now
            batch.waiting_for_lock = False
            if batch.error is not None:
                error, batch.error = batch.error, None
                self._abort_batch(batch, error, rolled_back=True)
            else:
                batch = self._run_batch(batch.units, begun=True)
                if batch.needs_commit:
                    self._commit_here(batch)
        self._finish(batch)
        if self._queue and self._reactor is not None and self._flush_call is None and not self._closing:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _run_batch(self, units: list, *, wait_for_lock: bool = True, begun: bool = False) -> _Batch:
        """BEGIN and every unit, each in its own SAVEPOINT (none for a batch of one: a failing single unit
        rolls the transaction back); COMMIT is the caller's.  On a storage error the whole batch fails.
        ``begun``: BEGIN is done already.  Not ``wait_for_lock``: if another process holds the write lock,
        return at once a batch marked ``waiting_for_lock`` (nothing run)."""
        batch = _Batch(units)
        conn = self._writer
        if not begun:
            try:
                if self._committer is None:
                    self.backend.begin(conn)  # (the connection waits for a lock itself)
                elif wait_for_lock:
                    threads.begin_waiting(conn)
                else:
                    conn.execute("BEGIN IMMEDIATE")
            except self._errors as e:
                if not wait_for_lock and threads.busy(e):
                    batch.waiting_for_lock = True
                    return batch
                self._abort_batch(batch, e, rolled_back=True)
                return batch
        self._version_checked = False
        caches = self.backend.caches_schedules  # (PostgreSQL: no cache of committed state, docs/chamber.md)
        txn = Txn(conn, self._clock(), known_schedules=self._schedules_known if caches else None,
                  known_topics=self._topics_known if caches else None, forget_topics=self._forget_topics)
        single = len(units) == 1
        results, failures = batch.results, batch.failures
        queue_changed = False
        for work, _ in units:
            settled_before = txn.settled.copy() if txn.settled else []
            schedules_before = txn.written_schedules.copy() if txn.written_schedules else {}
            txn.queue_changed = False
            try:
                if not single:
                    conn.execute("SAVEPOINT unit")
                try:
                    if self._unit_hooks:
                        txn.appointments_before, txn.appointment_events = {}, []
                        txn.slots_before, txn.prescription_events = {}, []
                    result = work(txn)
                    for hook in self._unit_hooks:
                        hook(txn)
                except Exception as e:  # undo this unit only: its decision (or a bug), or the store failed
                    if single:
                        if conn.in_transaction:  # (SQLite may have rolled back already: disk full)
                            conn.execute("ROLLBACK")
                    else:
                        conn.execute("ROLLBACK TO unit")
                        conn.execute("RELEASE unit")
                    txn.settled = settled_before
                    txn.written_schedules = schedules_before
                    if isinstance(e, self._errors):  # disk full, I/O error: not the unit's own decision
                        log.error("chamber.write.failed", error=str(e))
                        e = ChamberWriteError(f"the chamber could not record this: {e}")
                    results.append(None)
                    failures.append(e)
                else:
                    if not single:
                        conn.execute("RELEASE unit")
                    results.append(result)
                    failures.append(None)
                    queue_changed = queue_changed or txn.queue_changed
            except self._errors as e:  # even the savepoint could not be handled: give up the whole batch
                self._abort_batch(batch, e)
                return batch
        if any(f is None for f in failures):
            batch.needs_commit = True
            batch.settled = txn.settled
            batch.schedules = txn.written_schedules
            batch.queue_changed = queue_changed
        elif not single:  # every unit failed: nothing to commit
            try:
                conn.execute("ROLLBACK")
            except self._errors:
                pass
        return batch

    def _schedules_known(self) -> dict[str, tuple]:
        """The schedules known as committed (inside a transaction: the write lock is held).  Forgotten if
        another connection (the other gate, a CLI tool) has committed since: it may have changed them."""
        self._forget_others_changes()
        return self._known_schedules

    def _topics_known(self, load: Callable[[], set[str]]) -> set[str]:
        """The subscription topics with an active subscription (``load()`` reads them), kept between
        transactions as the schedules are; forgotten when a transaction changes a subscription."""
        self._forget_others_changes()
        if self._known_topics is None:
            self._known_topics = load()
        return self._known_topics

    def _forget_topics(self) -> None:
        self._known_topics = None

    def _forget_others_changes(self) -> None:
        """Once per transaction: forget what is cached of the committed state if another connection (the other
        gate, a CLI tool) has committed since (one ``PRAGMA data_version``)."""
        if self._version_checked:
            return
        self._version_checked = True
        version = self.backend.data_version(self._writer)
        if version != self._seen_version:
            self._known_schedules.clear()
            self._known_topics = None
            self._seen_version = version

    def _commit_here(self, batch: _Batch) -> None:
        try:
            threads.commit(self._writer)
        except self._errors as e:
            batch.error = e
            try:
                self._writer.execute("ROLLBACK")
            except self._errors:
                pass

    def _finish(self, batch: _Batch) -> None:
        """COMMIT has returned: answer the units (in order), then tell the observers."""
        if batch.error is not None:
            self._abort_batch(batch, batch.error, rolled_back=True)
        elif batch.needs_commit:
            if len(self._known_schedules) + len(batch.schedules) > _KNOWN_SCHEDULES_MAX:
                self._known_schedules.clear()
            self._known_schedules.update(batch.schedules)
        for (_, d), result, failure in zip(batch.units, batch.results, batch.failures):
            if d is None:
                continue
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(result)
        if batch.needs_commit and batch.error is None:
            if self._checkpointer is not None:
                self._checkpointer.committed()
            self._notify(other_process=self._watch is not None and self._watch.other_commits(),
                         queue_changed=batch.queue_changed)
            if batch.settled:
                for observer in list(self._settled_observers):
                    try:
                        observer(batch.settled)
                    except Exception:
                        log.exception("chamber.observer.failed")

    def _notify(self, *, own: bool = True, other_process: bool = False, queue_changed: bool = True) -> None:
        for observer, after_own in list(self._observers):
            if other_process or (own and (after_own is True or (after_own == "queue" and queue_changed))):
                try:
                    observer()
                except Exception:
                    log.exception("chamber.observer.failed")

    def _abort_batch(self, batch: _Batch, error: Exception, rolled_back: bool = False) -> None:
        if not rolled_back:
            try:
                self._writer.execute("ROLLBACK")
            except self._errors:
                pass
        log.error("chamber.write.failed", error=str(error), batch=len(batch.units))
        err = ChamberWriteError(f"the chamber could not commit: {error}")
        batch.results[:] = [None] * len(batch.units)
        batch.failures[:] = [err] * len(batch.units)
        batch.needs_commit = False
        batch.settled, batch.schedules = [], {}

    # -- reading and notification -----------------------------------------------------------------------------
    def read(self) -> Reader:
        """Committed state (never a batch whose COMMIT has not returned)."""
        if self._reader is None:
            raise ChamberError("the chamber is closed")
        return Reader(self._reader, self._clock())

    def writable(self) -> tuple[bool, str]:
        """Can this process write now?  A batch in flight holds the write lock already: yes.  Otherwise take
        the write lock and give it back at once (BEGIN IMMEDIATE, ROLLBACK), writing nothing."""
        if self._writer is None:
            return False, "closed"
        if self._inflight is not None:
            return True, "ok"
        try:
            if self._committer is not None:
                threads.begin_waiting(self._writer)
            else:
                self.backend.begin(self._writer)
            self._writer.execute("ROLLBACK")
            return True, "ok"
        except self._errors as e:
            return False, str(e)

    def watch(self, clock, interval: float = 0.01):
        """Notice commits made by *another process* (the other gate) and call the observers then: looks
        every ``interval`` seconds of ``clock``, soon after the other process writes the WAL file, and after
        each of this process's own commits (:class:`~gateway.chamber.watch.CommitWatch`).  Returns the
        LoopingCall (stop it with ``.stop()``; that stops the inotify watch too)."""
        if self.backend.kind != "sqlite":  # LISTEN/NOTIFY (gateway/chamber/postgresql.py: NotifyWatch)
            self._watch = self.backend.watch(lambda: self._writer, lambda: self._inflight is not None,
                                             lambda: self._notify(own=False, other_process=True))
            return self._watch.start(clock, interval)
        self._watch = CommitWatch(self.path, self._data_version, lambda: self._inflight is not None,
                                  lambda: self._notify(own=False, other_process=True))
        return self._watch.start(clock, interval)

    def _data_version(self) -> int | None:
        """The writer connection's ``PRAGMA data_version`` (None: the chamber is closed)."""
        if self._writer is None:
            return None
        return self.backend.data_version(self._writer)

    def observe(self, callback: Callable[[], None], *, own_commits: bool = True,
                queue_only: bool = False) -> Callable[[], None]:
        """Call ``callback`` after every commit that recorded something — this process's, and (while
        :meth:`watch` runs) another process's; with ``own_commits=False`` only another process's; with
        ``queue_only=True``, of this process's only those that queued an outbound message or changed a
        message's state (the relay's wake-up).  Returns a function that stops it."""
        entry = (callback, ("queue" if queue_only else True) if own_commits else False)
        self._observers.append(entry)
        return lambda: self._observers.remove(entry)

    def on_unit(self, hook: Callable[[Txn], None]) -> None:
        """Run ``hook(txn)`` at the end of every unit of work, inside its transaction (and savepoint): what it
        writes commits with the unit or not at all, and its failure fails the unit.  The domain's notifications
        (gateway/domain/notifications.py) are written this way, from ``txn.appointments_before``."""
        self._unit_hooks.append(hook)

    def observe_settled(self, callback: Callable[[list[str]], None]) -> Callable[[], None]:
        """Call ``callback(ids)`` after each commit of this process that cleared the pending change of these
        appointments (``update_appointment(..., pending_change=None)``); returns a function that stops it."""
        self._settled_observers.append(callback)
        return lambda: self._settled_observers.remove(callback)
