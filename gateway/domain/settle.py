"""Waiting for the HIS: a platform's request is answered once what it asked for has settled (the HIS answered,
or the gateway gave up on it), or after a timeout with "still waiting".

:class:`SettlementWaiters` keeps the waiters by id (an appointment's, a prescription's).  Its owner says
what "settled" means (``settled_among``: which of these ids have settled, one call for them all, read from
committed state) and wakes it after commits: :meth:`SettlementWaiters.settled` with the ids a commit of this
process settled (the chamber's settled observer says which: nothing is read), :meth:`SettlementWaiters.recheck`
after a commit that does not say (another process's, noticed by the chamber's watch).  Time is the clock's
it is given.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet import defer


class SettlementWaiters:
    """Deferreds waiting for ids to settle: each fires True once its id has settled, False once its timeout
    has passed."""

    def __init__(self, clock, settled_among: Callable[[list[str]], Iterable[str]]):
        self.clock = clock
        self._settled_among = settled_among
        self._waiters: dict[str, list[defer.Deferred]] = {}

    def wait(self, key: str, timeout: float) -> defer.Deferred:
        """Fires with True once ``key`` has settled (at once if it has), or False after ``timeout`` seconds."""
        if key in self._settled_among([key]):
            return defer.succeed(True)
        d: defer.Deferred = defer.Deferred()
        self._waiters.setdefault(key, []).append(d)
        call = self.clock.callLater(timeout, self._timed_out, key, d)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def _timed_out(self, key: str, d: defer.Deferred) -> None:
        waiters = self._waiters.get(key, [])
        if d in waiters:
            waiters.remove(d)
            if not waiters:
                self._waiters.pop(key, None)
        if not d.called:
            d.callback(False)

    def settled(self, keys: Iterable[str]) -> None:
        """These ids have settled: their waiters fire with True."""
        if not self._waiters:
            return
        for key in keys:
            for d in self._waiters.pop(key, []):
                if not d.called:
                    d.callback(True)

    def recheck(self) -> None:
        """After a commit that does not say what it settled: ask ``settled_among`` about every waiting id at
        once (reading them one by one took 39% of the gateway at saturation, docs/benchmarks.md)."""
        if self._waiters:
            self.settled(self._settled_among(list(self._waiters)))

    def stop(self, result: Any) -> None:
        """Fire every waiter with ``result`` (the service is stopping) and forget them."""
        for waiters in self._waiters.values():
            for d in waiters:
                if not d.called:
                    d.callback(result)
        self._waiters.clear()
