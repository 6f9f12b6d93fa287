"""Blocking calls to a HIS off the event loop (:class:`ThreadedLink`): a HIS's database driver or its web
service's client blocks, so its calls run on a thread pool of the link's own, bounded (``threads``), never on
the reactor thread, and each is abandoned after ``timeout`` (:class:`CallTimeout`; the kinds set their
drivers' own timeouts from it too, so an abandoned call ends and frees its thread).
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool


class CallTimeout(Exception):
    """A call to the HIS did not end within its timeout."""


class ThreadedLink(service.Service):
    """A bounded pool of threads for one HIS endpoint's blocking calls.  ``run`` replaces the pool (unit tests:
    ``run(fn, *args)`` calls at once, as there are no threads under a task.Clock)."""

    def __init__(self, name: str, *, threads: int, timeout: float, reactor, run=None):
        self.setName(name)
        self.threads = threads
        self.timeout = timeout
        self.reactor = reactor
        self._pool: ThreadPool | None = None
        self._run = run

    def startService(self):
        if self._run is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name=self.name)
            self._pool.start()
        super().startService()

    def stopService(self):
        super().stopService()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # (stopping the pool waits for the calls in progress, each bounded by its driver's timeouts: not
            # on the reactor thread)
            return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._stop, pool)
        self.closed()

    def _stop(self, pool: ThreadPool) -> None:
        pool.stop()
        self.closed()

    def closed(self) -> None:
        """After the last call (a subclass frees what its calls used)."""

    def call(self, fn, *args) -> defer.Deferred:
        """``fn(*args)`` on the pool; fails with CallTimeout after ``timeout``."""
        if self._run is not None:
            return self._run(fn, *args)
        if self._pool is None:
            return defer.fail(CallTimeout(f"{self.name} is stopped"))
        d = threads.deferToThreadPool(self.reactor, self._pool, fn, *args)
        timeout = self.timeout

        def timed_out(_result, _timeout):
            raise CallTimeout(f"no answer within {timeout:g}s")
        return d.addTimeout(timeout, self.reactor, onTimeoutCancel=timed_out)
