"""Rate limits for the outer gate: token buckets, one per platform and one for all platforms together.

A bucket holds at most ``burst`` tokens and gains ``per_second`` tokens a second; a request takes one.
When none is left the request is refused (429) and told how long until a token is back (Retry-After).
Time comes from an injected clock (``clock.seconds()``: the reactor, or ``task.Clock`` in tests).

The global bucket is consulted first; a request it lets through may still be refused by the platform's
own bucket (and then it has used a global token: a platform over its own limit cannot make room for
itself at others' expense, it only wastes its own turn).  Buckets live in memory: a restart refills them.

The OAuth2 token endpoint is reached before anyone is authenticated, so it cannot use the platform's
bucket (the client assertion's ``iss`` is only a claim until its signature is checked: keyed on it, anyone
could empty a victim's bucket).  It has one bucket per source address instead, consulted *before* the
global one: a client flooding the endpoint spends its own address's tokens, not everyone's.  At most
``max_sources`` addresses are remembered (the least recently seen is forgotten first), so a flood from many
addresses cannot grow the table without bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict
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
    """A refusal: which limit (``'global'``, ``'platform'`` or ``'source'``) and whole seconds to wait
    (Retry-After)."""

    scope: str
    retry_after: int


class RateLimiter:
    """``limits``: platform name -> (per_second, burst) or None (no limit); ``global_limit`` and
    ``source_limit`` (each source address's, for the token endpoint) likewise."""

    def __init__(self, limits: dict[str, tuple[float, int] | None], global_limit: tuple[float, int] | None,
                 clock, *, source_limit: tuple[float, int] | None = None, max_sources: int = 10_000):
        self._clock = clock
        self._global = TokenBucket(*global_limit, clock) if global_limit else None
        self._platforms = {name: TokenBucket(*limit, clock) for name, limit in limits.items() if limit}
        if source_limit is not None:
            TokenBucket(*source_limit, clock)  # (refuses a bad limit now, not at the first request)
        self._source_limit = source_limit
        self._max_sources = max_sources
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()

    def check_source(self, source: str | None) -> Throttled | None:
        """The source address's bucket (the token endpoint); None (an address unknown) shares one bucket."""
        if self._source_limit is None:
            return None
        key = source or ""
        bucket = self._sources.get(key)
        if bucket is None:
            bucket = self._sources[key] = TokenBucket(*self._source_limit, self._clock)
            while len(self._sources) > self._max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        return self._check(bucket, "source")

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
