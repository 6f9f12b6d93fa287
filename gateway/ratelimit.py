"""Rate limits for the outer gate: token buckets, one per platform and one for all platforms together.

A bucket holds at most ``burst`` tokens and gains ``per_second`` tokens a second; a request takes one.
When none is left the request is refused (429) and told how long until a token is back (Retry-After).
Time comes from an injected clock (``clock.seconds()``: the reactor, or ``task.Clock`` in tests).

The global bucket is consulted first; a request it lets through may still be refused by the platform's
own bucket (and then it has used a global token: a platform over its own limit cannot make room for
itself at others' expense, it only wastes its own turn).  Buckets live in memory: a restart refills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class TokenBucket:
    def __init__(self, per_second: float, burst: int, clock):
        if per_second <= 0 or burst < 1:
            raise ValueError("per_second must be positive and burst at least 1")
        self.per_second = float(per_second)
        self.burst = int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
        self._at = max(self._at, now)  # a clock that steps back does not mint tokens later

    def take(self) -> float:
        """Take a token: 0.0 when there was one, else the seconds until one will be there."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.per_second

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens


@dataclass(frozen=True)
class Throttled:
    """A refusal: which limit (``'global'`` or ``'platform'``) and whole seconds to wait (Retry-After)."""

    scope: str
    retry_after: int


class RateLimiter:
    """``limits``: platform name -> (per_second, burst) or None (no limit); ``global_limit`` likewise."""

    def __init__(self, limits: dict[str, tuple[float, int] | None], global_limit: tuple[float, int] | None,
                 clock):
        self._global = TokenBucket(*global_limit, clock) if global_limit else None
        self._platforms = {name: TokenBucket(*limit, clock) for name, limit in limits.items() if limit}

    def check_global(self) -> Throttled | None:
        return self._check(self._global, "global")

    def check_platform(self, platform: str) -> Throttled | None:
        return self._check(self._platforms.get(platform), "platform")

    @staticmethod
    def _check(bucket: TokenBucket | None, scope: str) -> Throttled | None:
        if bucket is None:
            return None
        wait = bucket.take()
        if wait <= 0:
            return None
        return Throttled(scope, max(1, math.ceil(wait)))
