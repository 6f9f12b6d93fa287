"""The hospital's own registration counter: books random free future slots over time.

Bookings come every ``60 / rate`` seconds on average, each interval jittered (x0.5..x1.5) by the
seeded RNG, on the injected clock. What a booking does (inventory change, notification, journal) is
the ``book`` callable's business.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class CounterClerk:
    def __init__(self, clock: IReactorTime, rng: random.Random, per_minute: float,
                 book: Callable[[], object]) -> None:
        self._clock = clock
        self._rng = rng
        self._per_minute = per_minute
        self._book = book
        self._call: IDelayedCall | None = None

    def next_delay(self) -> float:
        return 60.0 / self._per_minute * self._rng.uniform(0.5, 1.5)

    def start(self) -> None:
        if self._per_minute > 0 and self._call is None:
            self._call = self._clock.callLater(self.next_delay(), self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _tick(self) -> None:
        self._call = self._clock.callLater(self.next_delay(), self._tick)
        self._book()
