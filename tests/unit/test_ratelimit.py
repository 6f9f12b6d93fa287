"""Token buckets for the outer gate's rate limits, on an injected clock (task.Clock: no real time passes)."""

import pytest
from twisted.internet import task

from adapters.outer.ratelimit import RateLimiter, TokenBucket


def test_a_bucket_lets_a_burst_through_then_refuses_with_the_wait():
    """burst requests at once pass; the next is refused and told how long until a token is back."""
    clock = task.Clock()
    bucket = TokenBucket(per_second=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)


def test_a_bucket_refills_at_its_rate_and_never_above_its_size():
    """After a long quiet time the bucket holds burst tokens, not more."""
    clock = task.Clock()
    bucket = TokenBucket(per_second=10, burst=5, clock=clock)
    for _ in range(5):
        bucket.take()
    clock.advance(0.25)
    assert bucket.tokens == pytest.approx(2.5)
    clock.advance(3600)
    assert bucket.tokens == 5


def test_a_clock_stepping_back_mints_no_tokens():
    """If the clock goes back (NTP), the bucket waits for it to catch up instead of refilling twice."""
    clock = task.Clock()
    clock.advance(100)
    bucket = TokenBucket(per_second=1, burst=1, clock=clock)
    assert bucket.take() == 0.0
    clock.rightNow = 50.0
    assert bucket.take() > 0
    clock.rightNow = 100.5
    assert bucket.take() > 0
    clock.rightNow = 101.0
    assert bucket.take() == 0.0


def test_the_limiter_has_one_bucket_per_platform_and_one_for_all():
    """Each platform has its own bucket (one platform's burst does not use another's); the global bucket
    refuses everyone once all platforms together are over it; Retry-After is whole seconds, at least 1."""
    clock = task.Clock()
    limiter = RateLimiter({"a": (1.0, 2), "b": (1.0, 2), "free": None}, (0.5, 5), clock)
    assert limiter.check_platform("a") is None and limiter.check_platform("a") is None
    refused = limiter.check_platform("a")
    assert (refused.scope, refused.retry_after) == ("platform", 1)
    assert limiter.check_platform("b") is None
    assert all(limiter.check_platform("free") is None for _ in range(100))  # no limit configured
    assert all(limiter.check_global() is None for _ in range(5))
    refused = limiter.check_global()
    assert (refused.scope, refused.retry_after) == ("global", 2)  # 1 token at 0.5/s: 2 s


def test_without_a_global_limit_nothing_is_refused_globally():
    limiter = RateLimiter({}, None, task.Clock())
    assert all(limiter.check_global() is None for _ in range(10_000))


def test_each_source_address_has_its_own_bucket_and_few_are_remembered():
    """The token endpoint's limit: one bucket per source address (another address is not refused when one
    is over it); at most max_sources addresses are kept, the least recently seen forgotten first (a forgotten
    address starts again with a full bucket); without the limit nothing is refused."""
    clock = task.Clock()
    limiter = RateLimiter({}, None, clock, source_limit=(1.0, 2), max_sources=2)
    assert limiter.check_source("192.0.2.1") is None and limiter.check_source("192.0.2.1") is None
    refused = limiter.check_source("192.0.2.1")
    assert (refused.scope, refused.retry_after) == ("source", 1)
    assert limiter.check_source("192.0.2.2") is None
    assert limiter.check_source("192.0.2.1") is not None  # .1 seen again: .2 is now the least recent
    assert limiter.check_source("192.0.2.3") is None  # a third address: .2 is forgotten
    assert limiter.check_source("192.0.2.1") is not None  # .1 kept its (empty) bucket
    clock.advance(1)
    assert limiter.check_source("192.0.2.1") is None
    free = RateLimiter({}, None, clock)
    assert all(free.check_source("192.0.2.1") is None for _ in range(1000))
    with pytest.raises(ValueError):
        RateLimiter({}, None, clock, source_limit=(0.0, 1))
