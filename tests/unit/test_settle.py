"""Waiting for the HIS to settle a request (gateway.domain.settle): a waiter fires True when its id settles —
told by a commit, or found by asking about every waiting id at once — False after its timeout, at once when
the id has already settled, and with the stop's result when the service stops.  No chamber: ``settled_among``
is the owner's question, and the test's; time is a task.Clock."""

from twisted.internet import task

from gateway.domain.settle import SettlementWaiters
from tests.deferreds import assertNoResult, successResultOf


class Owner:
    """Says which ids have settled, and counts how often it was asked (and about what)."""

    def __init__(self, settled=()):
        self.settled, self.asked = set(settled), []

    def settled_among(self, ids):
        self.asked.append(sorted(ids))
        return {i for i in ids if i in self.settled}


def test_a_waiter_fires_true_when_its_id_settles_and_the_others_keep_waiting():
    clock, owner = task.Clock(), Owner()
    waiters = SettlementWaiters(clock, owner.settled_among)
    a, a_again, b = waiters.wait("a", 5), waiters.wait("a", 5), waiters.wait("b", 5)
    waiters.settled(["a", "unknown"])
    assert (successResultOf(a), successResultOf(a_again)) == (True, True)
    assertNoResult(b)
    assert [call.getTime() for call in clock.getDelayedCalls()] == [5]  # b's: a's timers went when it fired


def test_a_waiter_fires_false_after_its_timeout_and_is_forgotten():
    clock, owner = task.Clock(), Owner()
    waiters = SettlementWaiters(clock, owner.settled_among)
    a = waiters.wait("a", 5)
    clock.advance(4.9)
    assertNoResult(a)
    clock.advance(0.1)
    assert successResultOf(a) is False
    owner.asked.clear()
    waiters.recheck()  # nothing waits any more: nothing is asked
    assert owner.asked == []


def test_an_id_already_settled_fires_at_once_without_a_timer():
    clock, owner = task.Clock(), Owner(settled={"a"})
    waiters = SettlementWaiters(clock, owner.settled_among)
    assert successResultOf(waiters.wait("a", 5)) is True
    assert owner.asked == [["a"]] and clock.getDelayedCalls() == []


def test_recheck_asks_about_every_waiting_id_in_one_call():
    """After a commit that does not say what it settled (another process's): one question for all waiters."""
    clock, owner = task.Clock(), Owner()
    waiters = SettlementWaiters(clock, owner.settled_among)
    a, b, c = (waiters.wait(key, 5) for key in "abc")
    owner.settled |= {"a", "c"}
    owner.asked.clear()
    waiters.recheck()
    assert owner.asked == [["a", "b", "c"]]
    assert (successResultOf(a), successResultOf(c)) == (True, True)
    assertNoResult(b)


def test_stop_fires_every_waiter_with_its_result():
    clock, owner = task.Clock(), Owner()
    waiters = SettlementWaiters(clock, owner.settled_among)
    a, b = waiters.wait("a", 5), waiters.wait("b", 5)
    waiters.stop(False)
    assert successResultOf(b) is False
    assert clock.getDelayedCalls() == []
    waiters.settled(["a"])  # forgotten: nothing fires twice
    assert successResultOf(a) is False  # stop's result, read after settled
