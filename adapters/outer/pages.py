"""Rendered search pages kept in memory until the chamber changes (issue 21: a GET /Slot page cost ~30 µs per
slot on every request — the read, the row objects, the FHIR Slot, the JSON — though the slots change far
less often than platforms ask).

:class:`SlotPages` keeps each page as :class:`Rendered` (the Bundle, and its JSON once written), keyed by the
platform, the base URL and the whole query as the client sent it (every parameter and value, in its order:
the page's links repeat them; quotas make pages differ per platform).  A page is given again only while
nothing can have changed it:

- **a change**: every unit of work of this process drops all pages as it runs (``Chamber.on_unit``: before its
  COMMIT, before its answer), and no page is kept or given while one is on its way to its COMMIT; after each
  commit (``Chamber.observe``: this process's, and while the chamber is watched another process's) the pages
  are dropped again and keeping them resumes.  So a page never shows a slot state older than a commit whose
  answer this process gave.
- **the clock**: a page is kept only until the first instant at which time alone could change it
  (``valid_until``, decided by the search: a free slot starting, a quota's release, midnight), and never more
  than ``max_age`` (1 s): a command that writes the chamber from another process while ``gatewayd run`` keeps
  both gates in one (``gatewayd queue retry`` of a refused SIU) is not watched for, and shows within it.

The other process of the split lock is seen only by the watch (within ~10 ms, or at once with inotify), so the
split lock's outer gate keeps no pages (gateway/service.py); docs/benchmarks.md says what the chamber would
need to offer for it (a version of the committed state to compare at each hit).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Hashable


class Rendered(dict):
    """A resource (a dict, answered as any other) whose compact JSON is written once and then reused."""

    __slots__ = ("_json",)

    def encoded(self) -> bytes:
        """``json.dumps(self, ensure_ascii=False)`` in UTF-8, as the answer writes any body: made once."""
        data = getattr(self, "_json", None)
        if data is None:
            data = self._json = json.dumps(self, ensure_ascii=False).encode("utf-8")
        return data


class SlotPages:
    """Rendered pages by key, with the rules of the module docstring; ``max_pages`` bounds the memory (when
    full, all are dropped: a new query per request cannot grow it).  A page of 100 slots holds ~60 KB of JSON and
    its dict ~4x that (~320 KB in all, measured): 128 pages stay under ~40 MB whatever the queries."""

    def __init__(self, clock: Callable[[], float], max_pages: int = 128, max_age: float = 1.0):
        self.clock = clock  # (monotonic enough: the reactor's seconds) for max_age
        self.max_pages = max_pages
        self.max_age = max_age
        self._pages: dict[Hashable, tuple[float, float, Rendered]] = {}  # key -> (valid until, kept until, page)
        self._writing = False  # a unit of work of this process ran and its commit's observers have not yet
        self.hits = 0
        self.misses = 0

    @classmethod
    def attached(cls, chamber, clock: Callable[[], float], **kw) -> "SlotPages":
        """New pages, told of every unit of work and every commit of ``chamber`` (gateway/service.py)."""
        pages = cls(clock, **kw)
        chamber.on_unit(pages.unit)
        chamber.observe(pages.committed)
        return pages

    # -- the chamber's hooks ---------------------------------------------------------------------------------
    def unit(self, _txn: Any = None) -> None:
        """``Chamber.on_unit``: a unit of work is running (inside its transaction): what it writes may change
        any page, and its COMMIT is on its way."""
        self._writing = True
        self._pages.clear()

    def committed(self) -> None:
        """``Chamber.observe``: a commit (this process's or, watched, another's) has been answered."""
        self._writing = False
        self._pages.clear()

    def __len__(self) -> int:
        return len(self._pages)

    # -- the search's side --------------------------------------------------------------------------------------
    def get(self, key: Hashable, now: float) -> Rendered | None:
        if not self._writing:
            entry = self._pages.get(key)
            if entry is not None and now < entry[0] and self.clock() < entry[1]:
                self.hits += 1
                return entry[2]
        self.misses += 1
        return None

    def put(self, key: Hashable, page: dict, valid_until: float, now: float) -> Rendered:
        """Keep ``page`` (read from committed state at ``now``) until ``valid_until``; returns it as Rendered."""
        rendered = page if isinstance(page, Rendered) else Rendered(page)
        if not self._writing and now < valid_until:
            if len(self._pages) >= self.max_pages:
                self._pages.clear()
            self._pages[key] = (valid_until, self.clock() + self.max_age, rendered)
        return rendered
