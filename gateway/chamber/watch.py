"""The cross-process watch: notices commits that *another process* (the other gate of the split lock) made
to the chamber file, so this process's observers run then, as they do after its own commits.

SQLite's ``PRAGMA data_version`` (of the writer connection, whose own commits do not change it) changes
when another connection commits; reading it costs a look at the WAL index in shared memory (a file-system
wake-up, no socket between the gates).  It is looked at every ``interval`` seconds and, between those, as
soon as possible after the other process writes to the WAL file (inotify, on Linux with a real reactor: see
:meth:`CommitWatch._watch_wal`), and after each of this process's own commits (the engine asks
:meth:`CommitWatch.other_commits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from twisted.internet import task
from twisted.internet.interfaces import IReactorFDSet


class CommitWatch:
    """Looks for another process's commits to the chamber at ``path`` and calls ``on_commit`` when it sees
    one.  ``data_version()``: the writer connection's ``PRAGMA data_version`` (None: the chamber is closed);
    ``busy()``: a COMMIT of this process is in flight (the writer connection is busy: the look is made when
    that COMMIT has returned)."""

    def __init__(self, path: str, data_version: Callable[[], int | None], busy: Callable[[], bool],
                 on_commit: Callable[[], None]):
        self.path = path
        self._data_version = data_version
        self._busy = busy
        self._on_commit = on_commit
        self._seen: int | None = None  # data_version as the watch last saw it
        self.watching = False

    def start(self, clock, interval: float) -> task.LoopingCall:
        """Look every ``interval`` seconds of ``clock`` (and on the WAL file's writes); returns the
        LoopingCall (stop it with ``.stop()``; that stops the inotify watch too)."""
        self.watching = True
        self._seen = self._data_version()
        loop = task.LoopingCall(self.look)
        loop.clock = clock
        stop_wal_watch = self._watch_wal(clock)

        def stopped(result):
            self.watching = False
            stop_wal_watch()
            return result

        loop.start(interval, now=False).addBoth(stopped)
        return loop

    def look(self) -> None:
        """One look for another process's commits (skipped while a COMMIT of ours is in flight)."""
        if self._busy():
            return
        if self.other_commits():
            self._on_commit()

    def other_commits(self) -> bool:
        """Has another process committed since the watch last looked?  (False when it does not watch, or
        the chamber is closed.)"""
        return self.watching and self._changed(self._data_version())

    def _changed(self, version: int | None) -> bool:
        if version is None or version == self._seen:
            return False
        self._seen = version
        return True

    def _watch_wal(self, clock) -> Callable[[], None]:
        """Look for the other process's commits soon after it writes to the WAL file (inotify on the
        chamber's directory); returns a function that stops watching.  A commit's frames are written
        before its fsync and only visible after it, so a write is followed by looks 1, 3, 7 and 15 ms after
        it until data_version changes.  Without inotify (not Linux, a fake reactor), nothing: the
        interval's looks remain."""
        if self.path == ":memory:" or not IReactorFDSet.providedBy(clock):
            return lambda: None
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            notifier = inotify.INotify(reactor=clock)
            notifier.startReading()
        except Exception:  # noqa: BLE001 - no inotify here: the interval's looks remain
            return lambda: None
        wal_name = Path(self.path).name + "-wal"
        pending = {"call": None}

        def look_again(n: int) -> None:
            pending["call"] = None
            if not self.watching:
                return
            if not self._busy():
                version = self._data_version()
                if version is None:  # the chamber is closed
                    return
                if self._changed(version):
                    self._on_commit()
                    return
            if n < 4:  # looks 1, 3, 7 and 15 ms after the write (then only the interval's)
                pending["call"] = clock.callLater(0.001 * 2 ** n, look_again, n + 1)

        wal_names = (wal_name, wal_name.encode("utf-8", "surrogateescape"))  # (inotify's paths are bytes)

        def written(_watch, path, _mask) -> None:
            # (this process's own writes wake it too: it cannot tell them apart; a burst of writes is one
            # series of looks)
            if path.basename() in wal_names and pending["call"] is None:
                pending["call"] = clock.callLater(0.001, look_again, 1)

        try:
            notifier.watch(FilePath(str(Path(self.path).resolve().parent)), mask=inotify.IN_MODIFY,
                           callbacks=[written])
        except Exception:  # noqa: BLE001
            notifier.loseConnection()
            return lambda: None

        def stop() -> None:
            if pending["call"] is not None and pending["call"].active():
                pending["call"].cancel()
            notifier.loseConnection()

        return stop
