"""Reading a Deferred's result in a pytest-style test, with Twisted's own helpers.

The code under test fires its Deferreds synchronously (a task.Clock, a chamber committing in the caller's
turn, StringTransport and iosim connections), so a test reads the result at once instead of running a
reactor. These are trial's ``SynchronousTestCase`` assertions, bound to one instance so that plain functions
can call them (no trial runner):

- ``successResultOf(d)``: the result of a fired Deferred; fails the test if it has none yet or failed.
- ``failureResultOf(d, *types)``: the Failure of a Deferred that failed (with one of ``types``, if given);
  fails the test if it has no result yet or succeeded.
- ``assertNoResult(d)``: fails the test if ``d`` has fired; the result is left for a later read.

The first two consume the result, as a callback that returns None would: read each Deferred once.
"""

from twisted.trial.unittest import SynchronousTestCase

_case = SynchronousTestCase()

successResultOf = _case.successResultOf
failureResultOf = _case.failureResultOf
assertNoResult = _case.assertNoResult
