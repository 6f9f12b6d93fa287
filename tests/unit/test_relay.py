"""The relay: strict FIFO, one in flight, resend with the same control id after backoff, every step
committed, and recovery of a message that was in flight when the process died.

The destination here is a scripted stand-in for the HIS link (the relay is what is under test); the
real MLLP link is exercised in the end-to-end tests.
"""

import functools
import json
import random
import time
from datetime import datetime

import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from adapters.inner.his import HisDestination
from gateway.ops.admin import AdminResource, Metrics
from gateway.chamber.engine import Chamber
from gateway.relay import DeliveryFailed, HisUnreachable, Relay
from gateway.domain.model import HisAnswer
from tests.deferreds import failureResultOf, successResultOf
from tests.unit.test_mllp_protocols import World, siu


class ScriptedHis:
    """Records deliveries; each is answered by the test through the Deferred it left pending."""

    def __init__(self):
        self.calls: list[tuple[bytes, str, defer.Deferred]] = []

    def deliver(self, body, control_id, timeout):
        d = defer.Deferred()
        self.calls.append((body, control_id, d))
        return d

    def close(self):
        return defer.succeed(None)


@pytest.fixture
def env(chamber_backend):
    """(once on each chamber backend: tests/conftest.py)"""
    clock = task.Clock()
    clock.advance(1000)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    his = ScriptedHis()
    answers = []
    relay = Relay(chamber, "his", his, lambda tx, msg, ans: answers.append((msg.control_id, ans.code)),
                  clock=clock, ack_timeout=5, retry_initial=1, retry_max=8, max_attempts=3, max_age=600,
                  on_dead=lambda tx, msg, reason: answers.append((msg.control_id, "dead", reason)),
                  rng=random.Random(1))
    yield chamber, his, relay, clock, answers
    if relay.running:
        relay.stopService()
    chamber.close()


def queue(chamber, control_id, body=b"MSH|..."):
    return chamber.transact_now(lambda tx: tx.add_message(
        direction="outbound", peer="his", control_id=control_id, type="SRM^S01", state="committed",
        body=body, charset="utf-8"))


def test_delivers_in_order_one_at_a_time(env):
    """Two queued messages: the second is not sent before the first is answered."""
    chamber, his, relay, _, answers = env
    queue(chamber, "G1")
    queue(chamber, "G2")
    relay.startService()
    assert [c[1] for c in his.calls] == ["G1"]
    his.calls[0][2].callback(HisAnswer("AA"))
    assert [c[1] for c in his.calls] == ["G1", "G2"]
    his.calls[1][2].callback(HisAnswer("AR", "no"))
    assert answers == [("G1", "AA"), ("G2", "AR")]
    states = [m.state for m in reversed(chamber.read().messages())]
    assert states == ["delivered", "refused"]


def test_failed_delivery_is_resent_with_the_same_control_id_after_backoff(env):
    """No answer: the message stays at the head, nothing overtakes it, and it is resent unchanged."""
    chamber, his, relay, clock, answers = env
    first = queue(chamber, "G1", b"body-1")
    queue(chamber, "G2")
    relay.startService()
    his.calls[0][2].errback(DeliveryFailed("AckTimeout"))
    msg = chamber.read().message(first)
    assert msg.state == "retrying" and msg.attempts == 1
    delay = msg.next_attempt - clock.seconds()
    assert 0.5 <= delay <= 1.0  # first step of the backoff, with jitter
    assert len(his.calls) == 1
    clock.advance(delay)
    assert [(c[0], c[1]) for c in his.calls] == [(b"body-1", "G1"), (b"body-1", "G1")]
    his.calls[1][2].errback(DeliveryFailed("refused"))
    second_delay = chamber.read().message(first).next_attempt - clock.seconds()
    assert 1.0 <= second_delay <= 2.0  # doubled
    clock.advance(second_delay)
    his.calls[2][2].callback(HisAnswer("AA"))
    assert [c[1] for c in his.calls] == ["G1", "G1", "G1", "G2"]
    story = [s for _, s, _ in chamber.read().message_events(first)]
    assert story == ["committed", "sending", "retrying", "sending", "retrying", "sending", "delivered"]


def test_message_in_flight_at_a_crash_is_sent_again_on_start(env):
    """A message left 'sending' (the process died waiting for the ACK) is resent with its control id."""
    chamber, his, relay, _, _ = env
    mid = queue(chamber, "G1")
    chamber.transact_now(lambda tx: tx.set_message_state(mid, "sending", attempts=1))
    relay.startService()
    assert [c[1] for c in his.calls] == ["G1"]
    his.calls[0][2].callback(HisAnswer("AA"))
    assert chamber.read().message(mid).attempts == 2


def test_wakes_when_something_is_committed(env):
    """A commit in the chamber wakes an idle relay at once (no waiting for the poll)."""
    chamber, his, relay, _, _ = env
    relay.startService()
    assert his.calls == []
    queue(chamber, "G9")
    assert [c[1] for c in his.calls] == ["G9"]


def test_withdrawn_messages_are_not_sent(env):
    chamber, his, relay, _, _ = env
    mid = queue(chamber, "G1")
    chamber.transact_now(lambda tx: tx.set_message_state(mid, "withdrawn"))
    queue(chamber, "G2")
    relay.startService()
    assert [c[1] for c in his.calls] == ["G2"]


def test_ar_is_final_and_ae_is_dead_lettered_with_the_his_text(env):
    """HL7 rules: AR means the message is unacceptable (refused, never resent); AE is an application
    error at the HIS (dead-lettered with its text); the queue moves on in both cases."""
    chamber, his, relay, _, answers = env
    first, second = queue(chamber, "G1"), queue(chamber, "G2")
    queue(chamber, "G3")
    relay.startService()
    his.calls[0][2].callback(HisAnswer("AR", "unknown schedule"))
    his.calls[1][2].callback(HisAnswer("AE", "database locked"))
    assert [c[1] for c in his.calls] == ["G1", "G2", "G3"]
    assert chamber.read().message(first).state == "refused"
    dead = chamber.read().message(second)
    assert (dead.state, dead.last_error) == ("dead", "AE: database locked")


def test_dead_letter_after_max_attempts_with_the_reason(env):
    """Three unanswered attempts (max_attempts=3): dead-lettered with the last error; the booking side is
    told (on_dead); the next message goes."""
    chamber, his, relay, clock, answers = env
    first = queue(chamber, "G1")
    queue(chamber, "G2")
    relay.startService()
    for attempt in range(3):
        his.calls[-1][2].errback(DeliveryFailed("AckTimeout: no ACK within 5s"))
        clock.advance(10)
    msg = chamber.read().message(first)
    assert msg.state == "dead" and msg.attempts == 3
    assert "no answer after 3 attempts" in msg.last_error and "AckTimeout" in msg.last_error
    assert answers[0][:2] == ("G1", "dead")
    assert his.calls[-1][1] == "G2"


def test_max_age_ends_a_message_the_his_fails_not_one_it_takes(env):
    """Older than max_age (600 s) is no reason not to send: the HIS may take it (G2, delivered).  An attempt
    that reached the HIS and failed dead-letters a message that old (G1, on its first attempt)."""
    chamber, his, relay, clock, answers = env
    first, second = queue(chamber, "G1"), queue(chamber, "G2")
    clock.advance(601)
    relay.startService()
    his.calls[0][2].errback(DeliveryFailed("AckTimeout: no ACK within 5s"))
    msg = chamber.read().message(first)
    assert (msg.state, msg.attempts) == ("dead", 1)
    assert "not delivered within 600s (max_age)" in msg.last_error and "AckTimeout" in msg.last_error
    his.calls[1][2].callback(HisAnswer("AA"))
    assert [c[1] for c in his.calls] == ["G1", "G2"] and chamber.read().message(second).state == "delivered"


def test_ordering_by_patient_lets_other_patients_pass_and_keeps_each_patients_order(chamber_backend):
    """ordering='patient', window 2: patient A's first message waits for a resend; B's goes meanwhile on
    the second lane; A's second message never overtakes A's first; never two of one patient in flight."""
    clock = task.Clock()
    clock.advance(1000)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    lanes = [ScriptedHis(), ScriptedHis()]
    relay = Relay(chamber, "his", lanes, lambda tx, msg, ans: None, clock=clock, ack_timeout=5, retry_initial=1,
                  retry_max=8, ordering="patient", rng=random.Random(1))

    def add(control_id, key):
        return chamber.transact_now(lambda tx: tx.add_message(
            direction="outbound", peer="his", control_id=control_id, type="SRM^S01", state="committed",
            body=b"MSH", charset="utf-8", order_key=key))

    add("A1", "patient-a"), add("A2", "patient-a"), add("B1", "patient-b")
    relay.startService()
    sent = lambda: [c[1] for lane in lanes for c in lane.calls]  # noqa: E731
    assert sorted(sent()) == ["A1", "B1"]  # two lanes, two patients; A2 waits behind A1
    a_lane = next(lane for lane in lanes if lane.calls[0][1] == "A1")
    a_lane.calls[0][2].errback(DeliveryFailed("AckTimeout"))  # A1 must be resent later
    b_lane = next(lane for lane in lanes if lane.calls[0][1] == "B1")
    b_lane.calls[0][2].callback(HisAnswer("AA"))
    assert "A2" not in sent()  # A2 never overtakes A1
    clock.advance(2)
    assert sent().count("A1") == 2
    resend = next(c for lane in lanes for c in lane.calls if c[1] == "A1" and not c[2].called)
    resend[2].callback(HisAnswer("AA"))
    assert sent().count("A2") == 1  # released once A1 was answered
    relay.stopService()
    chamber.close()


def test_fifo_refuses_a_window_above_one(chamber_backend):
    chamber = Chamber(backend=chamber_backend(), clock=time.time)
    with pytest.raises(ValueError, match="one message in flight"):
        Relay(chamber, "his", [ScriptedHis(), ScriptedHis()], lambda *a: None, clock=task.Clock(), ack_timeout=1,
              retry_initial=1, retry_max=1)


def test_an_intent_is_encoded_once_and_resent_byte_for_byte(chamber_backend):
    """A message committed without HL7 (by the outer gate) is encoded by the relay before its first send,
    stored, and every resend carries exactly those bytes; a relay without an encoder dead-letters it."""
    clock = task.Clock()
    clock.advance(1000)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    his = ScriptedHis()
    calls = []

    def encode(tx, msg):
        calls.append(msg.id)
        return f"MSH|encoded {len(calls)}".encode(), "SRM^S04", "utf-8"

    relay = Relay(chamber, "his", his, lambda *a: None, clock=clock, ack_timeout=5, retry_initial=1, retry_max=8,
                  encode=encode, rng=random.Random(1))
    mid = chamber.transact_now(lambda tx: tx.add_message(
        direction="outbound", peer="his", control_id="G1", type="SRM^cancel", state="committed", body=b"",
        charset=""))
    relay.startService()
    his.calls[0][2].errback(DeliveryFailed("AckTimeout"))
    clock.advance(2)
    assert [c[0] for c in his.calls] == [b"MSH|encoded 1"] * 2 and calls == [mid]
    msg = chamber.read().message(mid)
    assert (msg.type, msg.charset) == ("SRM^S04", "utf-8")
    relay.stopService()

    bare = Relay(chamber, "his", ScriptedHis(), lambda *a: None, clock=clock, ack_timeout=5, retry_initial=1,
                 retry_max=8)
    other = chamber.transact_now(lambda tx: tx.add_message(
        direction="outbound", peer="his", control_id="G2", type="SRM^S01", state="committed", body=b"", charset=""))
    chamber.transact_now(lambda tx: tx.set_message_state(mid, "delivered"))
    bare.startService()
    assert chamber.read().message(other).state == "dead"
    assert "cannot be encoded" in chamber.read().message(other).last_error
    bare.stopService()
    chamber.close()


def test_one_commit_before_each_send_and_the_answer_commit_takes_the_next(chamber_backend):
    """Strict FIFO: a first send costs one commit (encoding and 'sending' together); after that, the commit
    that records an answer also encodes the next message and marks it 'sending' — one commit per message —
    and the next message is sent only after that commit, with its attempt counted and its bytes stored."""
    clock = task.Clock()
    clock.advance(1000)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    his = ScriptedHis()
    commits = []
    chamber.observe(lambda: commits.append(len(his.calls)))
    relay = Relay(chamber, "his", his, lambda *a: None, clock=clock, ack_timeout=5, retry_initial=1, retry_max=8,
                  encode=lambda tx, msg: (f"MSH|{msg.control_id}".encode(), "SRM^S01", "utf-8"),
                  rng=random.Random(1))
    ids = [chamber.transact_now(lambda tx, c=c: tx.add_message(
        direction="outbound", peer="his", control_id=c, type="SRM^S01", state="committed", body=b"",
        charset="")) for c in ("G1", "G2", "G3")]
    relay.startService()
    assert commits[-1:] == [0] and len(his.calls) == 1  # G1: one commit (encoded + 'sending'), then sent
    commits.clear()
    his.calls[0][2].callback(HisAnswer("AA"))
    assert commits == [1]  # one commit: G1 answered, G2 encoded and 'sending' ...
    assert [c[0] for c in his.calls] == [b"MSH|G1", b"MSH|G2"]  # ... then G2 sent
    his.calls[1][2].errback(DeliveryFailed("AckTimeout"))  # G2 waits for its backoff; G3 does not overtake it
    assert len(his.calls) == 2
    clock.advance(2)
    his.calls[2][2].callback(HisAnswer("AA"))
    his.calls[3][2].callback(HisAnswer("AA"))
    assert [c[1] for c in his.calls] == ["G1", "G2", "G2", "G3"]
    second = chamber.read().message(ids[1])
    assert (second.state, second.attempts, second.body) == ("delivered", 2, b"MSH|G2")
    story = [s for _, s, _ in chamber.read().message_events(ids[1])]
    assert story == ["committed", "committed", "sending", "retrying", "sending", "delivered"]  # 2nd: encoded
    relay.stopService()
    chamber.close()


def test_ordering_by_patient_reads_the_queue_once_for_all_the_lanes_a_wake_up_starts(chamber_backend, monkeypatch):
    """One wake-up starts every idle lane from one read of the queue (not one read per lane), and each lane
    still gets a different patient's oldest message; a message finished meanwhile is not sent."""
    from gateway.chamber.reader import Reader

    clock = task.Clock()
    clock.advance(1000)
    chamber = Chamber(backend=chamber_backend(), reactor=clock, clock=clock.seconds)  # commits on later turns
    chamber.open()
    lanes = [ScriptedHis() for _ in range(4)]
    relay = Relay(chamber, "his", lanes, lambda tx, msg, ans: None, clock=clock, ack_timeout=5, retry_initial=1,
                  retry_max=8, ordering="patient", rng=random.Random(1))

    def add(control_id, key, body=b"MSH"):
        return chamber.transact_now(lambda tx: tx.add_message(
            direction="outbound", peer="his", control_id=control_id, type="SRM^S01", state="committed",
            body=body, charset="utf-8", order_key=key))

    add("A1", "a"), add("A2", "a"), add("B1", "b"), add("C1", "c")
    reads = []
    real = Reader.unfinished_outbound
    monkeypatch.setattr(Reader, "unfinished_outbound",
                        lambda self, *a, **kw: (reads.append(1), real(self, *a, **kw))[1])
    relay.startService()
    assert len(reads) == 1  # four lanes started: A1, B1 and C1 taken (A2 waits for A1), one read
    clock.advance(0)  # their 'sending' commits
    sent = sorted(c[1] for lane in lanes for c in lane.calls)
    assert sent == ["A1", "B1", "C1"]
    relay.stopService()
    chamber.close()


def _claims_world(chamber_backend, monkeypatch, ordering="fifo", lanes=1):
    """A chamber whose batches commit on the next turn of a Clock (as on the reactor), COMMITs counted."""
    import gateway.chamber.threads as threads_module

    clock = task.Clock()
    clock.advance(1000)
    chamber = Chamber(backend=chamber_backend(), reactor=clock, clock=clock.seconds)
    chamber.open()
    commits = []
    real = threads_module.commit
    monkeypatch.setattr(threads_module, "commit", lambda conn: (commits.append(1), real(conn))[1])
    his = [ScriptedHis() for _ in range(lanes)]
    relay = Relay(chamber, "his", his if lanes > 1 else his[0], lambda tx, msg, ans: None, clock=clock,
                  ack_timeout=5, retry_initial=1, retry_max=8, ordering=ordering, rng=random.Random(1),
                  encode=lambda tx, row: (b"MSH|encoded " + row.control_id.encode(), "SRM^S01", "utf-8"))
    relay.startService()
    clock.advance(0)
    return chamber, relay, his if lanes > 1 else his[0], clock, commits


def _queue_and_claim(chamber, relay, control_id, key=None):
    """What the booking service does: its unit queues an intent (no HL7 yet), then, in the same turn, the
    relay is asked to join the batch."""
    d = chamber.transact(lambda tx: tx.add_message(
        direction="outbound", peer="his", control_id=control_id, type="SRM^S01", state="committed", body=b"",
        charset="", order_key=key))
    relay.claim_soon()
    return d


def test_a_claim_starts_the_delivery_in_the_commit_that_queued_the_message(chamber_backend, monkeypatch):
    """One COMMIT both queues the message and marks it sending (encoded once); the send follows with no
    commit of its own; the answer is the second COMMIT."""
    chamber, relay, his, clock, commits = _claims_world(chamber_backend, monkeypatch)
    commits.clear()
    _queue_and_claim(chamber, relay, "G1")
    clock.advance(0)
    assert len(commits) == 1
    assert [(body, cid) for body, cid, _ in his.calls] == [(b"MSH|encoded G1", "G1")]
    row = chamber.read().next_outbound("his")
    assert (row.state, row.attempts, row.body) == ("sending", 1, b"MSH|encoded G1")
    his.calls[0][2].callback(HisAnswer("AA", "", None))
    clock.advance(0)
    assert len(commits) == 2 and chamber.read().next_outbound("his") is None
    relay.stopService()
    chamber.close()


def test_a_claim_respects_the_order_and_a_busy_lane(chamber_backend, monkeypatch):
    """FIFO: while G1 is in flight a claim for G2 does nothing (G2 waits, then goes after G1's answer); a
    claim never sends ahead of an older message that waits for its resend."""
    chamber, relay, his, clock, commits = _claims_world(chamber_backend, monkeypatch)
    _queue_and_claim(chamber, relay, "G1")
    clock.advance(0)
    _queue_and_claim(chamber, relay, "G2")
    clock.advance(0)
    assert [cid for _, cid, _ in his.calls] == ["G1"]
    his.calls[0][2].errback(DeliveryFailed("AckTimeout"))  # G1 will be resent after its backoff
    clock.advance(0)
    _queue_and_claim(chamber, relay, "G3")
    clock.advance(0)
    assert [cid for _, cid, _ in his.calls] == ["G1"]  # neither G2 nor G3 overtakes G1
    clock.advance(10)
    assert [cid for _, cid, _ in his.calls] == ["G1", "G1"]
    his.calls[1][2].callback(HisAnswer("AA", "", None))
    clock.advance(0)
    assert [cid for _, cid, _ in his.calls] == ["G1", "G1", "G2"]
    relay.stopService()
    chamber.close()


def test_no_claims_when_ordering_by_patient(chamber_backend, monkeypatch):
    """ordering: patient takes its messages as before (a wake-up after the commit, then the send's own
    commit): claims measured no better there."""
    chamber, relay, lanes, clock, commits = _claims_world(chamber_backend, monkeypatch, ordering="patient", lanes=3)
    commits.clear()
    _queue_and_claim(chamber, relay, "A1", "a")
    clock.advance(0)
    assert len(commits) == 2 and [cid for lane in lanes for _, cid, _ in lane.calls] == ["A1"]  # queue, send
    relay.stopService()
    chamber.close()


def test_a_failed_batch_releases_the_claim(chamber_backend, monkeypatch):
    """If the batch's COMMIT fails, nothing was queued: the claimed lane is free again and sends nothing."""
    import gateway.chamber.threads as threads_module

    chamber, relay, his, clock, commits = _claims_world(chamber_backend, monkeypatch)
    real = threads_module.commit

    def failing(conn):
        conn.execute("ROLLBACK")
        raise chamber.backend.Error("disk I/O error")

    monkeypatch.setattr(threads_module, "commit", failing)
    d = _queue_and_claim(chamber, relay, "G1")
    clock.advance(0)
    failureResultOf(d)
    assert his.calls == [] and relay.lanes[0].loop is None and relay._in_flight == {}
    monkeypatch.setattr(threads_module, "commit", real)
    _queue_and_claim(chamber, relay, "G2")
    clock.advance(0)
    assert [cid for _, cid, _ in his.calls] == ["G2"]
    relay.stopService()
    chamber.close()


# -- an unreachable HIS (issue 15, finding 9) ---------------------------------------------------------------
# Here the destination is the real HIS link: HisDestination over an MLLPClient on a MemoryReactorClock
# (tests/unit/test_mllp_protocols.World), so "unreachable" is what the client really reports.


def _link_world(chamber_backend, with_metrics=False):
    """A World (a fake HIS listening on a MemoryReactorClock, an MLLPClient to it), a chamber on its clock and
    a relay delivering through HisDestination; max_attempts 3, max_age 600 s; ``relay.metrics`` if asked."""
    world = World()
    world.reactor.advance(1000)
    chamber = Chamber(backend=chamber_backend(), clock=world.reactor.seconds)
    chamber.open()
    outcomes = []
    settings = dict(ack_timeout=5, retry_initial=1, retry_max=8, max_attempts=3, max_age=600,
                    rng=random.Random(1), metrics=Metrics(chamber) if with_metrics else None)
    relay = Relay(chamber, "his", HisDestination(world.client),
                  lambda tx, msg, ans: outcomes.append((msg.control_id, ans.code)), clock=world.reactor,
                  on_dead=lambda tx, msg, reason: outcomes.append((msg.control_id, "dead", reason)), **settings)
    return world, chamber, relay, outcomes


def _refuse_connections(world, seconds: float) -> int:
    """Refuse every connection attempt the client makes for ``seconds`` of the world's clock; returns how
    many were refused."""
    refused, end = 0, world.reactor.seconds() + seconds
    while world.reactor.seconds() < end:
        if world.reactor.tcpClients:  # a connection attempt is waiting for its outcome
            world.completer.failOnce(Failure(ConnectionRefusedError("HIS down")))
            refused += 1
        world.reactor.advance(0.5)
    return refused


def test_an_unreachable_his_is_waited_for_never_dead_lettered(chamber_backend):
    """Connections refused for longer than max_attempts (3) tries and max_age (600 s) allow: the message is
    neither dead-lettered nor charged an attempt (it never reached the HIS); it waits at the head of the
    queue, retried with backoff capped at retry_max, and is delivered once the HIS listens again."""
    world, chamber, relay, outcomes = _link_world(chamber_backend)
    mid = queue(chamber, "G1", siu("G1"))
    relay.startService()
    refused = _refuse_connections(world, 900)
    msg = chamber.read().message(mid)
    assert (msg.state, msg.attempts, outcomes) == ("retrying", 0, [])
    assert refused >= 900 / 8  # tried all along, at least every retry_max
    world.reactor.advance(8)
    world.complete()
    assert outcomes == [("G1", "AA")]
    assert chamber.read().message(mid).state == "delivered"
    relay.stopService()
    chamber.close()


def test_an_outage_is_one_alert_per_interval_and_shows_in_health_and_metrics(chamber_backend):
    """While the HIS refuses connections: ``relay.his_unreachable`` once when the outage begins and then once a
    minute (not once per try: there are more than 100), no ``relay.retrying``; /healthz answers 503 naming the
    outage; ``gatewayd_his_unreachable_seconds`` gives its length and ``gatewayd_his_unreachable_total`` counts
    the tries.  When the HIS is back: ``relay.his_reachable`` once, /healthz 200, the gauge 0."""
    world, chamber, relay, outcomes = _link_world(chamber_backend, with_metrics=True)
    metrics = relay.metrics
    admin = AdminResource(chamber, metrics, [relay])

    def health():
        request = DummyRequest([b"healthz"])
        request.path = b"/healthz"
        body = json.loads(admin.render_GET(request))
        return request.responseCode or 200, body["his"]["his"]

    def sample(name):
        line = next(x for x in generate_latest(metrics.registry).decode().splitlines()
                    if x.startswith(name + '{peer="his"}'))
        return float(line.split()[-1])

    queue(chamber, "G1", siu("G1"))
    with capture_logs() as logs:
        relay.startService()
        refused = _refuse_connections(world, 600)
    alerts = [e for e in logs if e["event"] == "relay.his_unreachable"]
    assert refused > 60 and 10 <= len(alerts) <= 11
    assert alerts[0]["log_level"] == "error" and alerts[0]["outage_seconds"] == 0 and alerts[0]["waiting"] == 1
    assert all(b["outage_seconds"] - a["outage_seconds"] >= 60 for a, b in zip(alerts, alerts[1:]))
    assert not [e for e in logs if e["event"] == "relay.retrying"]
    code, his = health()
    assert code == 503 and his["reachable"] is False and his["unreachable_since"] == 1000
    assert "HIS down" in his["last_error"] and 590 <= his["unreachable_seconds"] <= 600
    assert sample("gatewayd_his_unreachable_seconds") == his["unreachable_seconds"]
    assert sample("gatewayd_his_unreachable_total") == refused

    with capture_logs() as logs:
        world.reactor.advance(8)
        world.complete()
    assert outcomes == [("G1", "AA")]
    assert [(e["event"], e["tries"]) for e in logs if e["event"].startswith("relay.his_")] == [
        ("relay.his_reachable", refused)]
    code, his = health()
    assert code == 200 and his["reachable"] and his["answering"]
    assert sample("gatewayd_his_unreachable_seconds") == 0
    relay.stopService()
    chamber.close()


def test_a_his_that_takes_the_message_and_does_not_answer_uses_up_its_attempts(chamber_backend):
    """The other failure: the message went out and no answer came (a timeout after the send, the connection
    lost after it): each counts, and after max_attempts (3) the message is dead-lettered as before."""
    world, chamber, relay, outcomes = _link_world(chamber_backend)
    world.script = lambda m: []  # the HIS reads and never answers
    mid = queue(chamber, "G1", siu("G1"))
    relay.startService()
    world.complete()
    world.reactor.advance(5)  # ack_timeout: attempt 1
    assert chamber.read().message(mid).attempts == 1
    world.reactor.advance(8)
    pump = world.complete()
    world.his[-1].transport.loseConnection()  # attempt 2: lost after the send
    pump.flush()
    assert chamber.read().message(mid).attempts == 2
    world.reactor.advance(8)
    world.complete()
    world.reactor.advance(5)  # attempt 3
    msg = chamber.read().message(mid)
    assert (msg.state, msg.attempts) == ("dead", 3) and "no answer after 3 attempts" in msg.last_error
    assert [m.control_id for m in world.received] == ["G1"] * 3 and outcomes[0][:2] == ("G1", "dead")
    relay.stopService()
    chamber.close()


def test_an_outage_does_not_age_a_message(chamber_backend):
    """max_age (600 s) counts from the commit or the end of the last outage, whichever is later: a message
    already 700 s old when the relay starts, with the HIS down, is tried (not dead-lettered) and waits through
    the outage; once the HIS is reached again, failed attempts (timeouts) have max_age from that moment, so
    max_attempts (3) ends it, not its age."""
    clock = task.Clock()
    clock.advance(1000)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    his = ScriptedHis()
    relay = Relay(chamber, "his", his, lambda *a: None, clock=clock, ack_timeout=5, retry_initial=1, retry_max=8,
                  max_attempts=3, max_age=600, rng=random.Random(1))
    mid = queue(chamber, "G1")
    clock.advance(700)
    relay.startService()
    while clock.seconds() < 2000:  # 300 s of outage
        his.calls[-1][2].errback(HisUnreachable("PeerUnavailable: connect failed"))
        msg = chamber.read().message(mid)
        assert (msg.state, msg.attempts) == ("retrying", 0)
        clock.advance(msg.next_attempt - clock.seconds())
    for attempt in (1, 2):
        his.calls[-1][2].errback(DeliveryFailed("AckTimeout: no ACK within 5s"))
        msg = chamber.read().message(mid)
        assert (msg.state, msg.attempts) == ("retrying", attempt)
        clock.advance(msg.next_attempt - clock.seconds())
    his.calls[-1][2].errback(DeliveryFailed("AckTimeout: no ACK within 5s"))
    msg = chamber.read().message(mid)
    assert msg.state == "dead" and "no answer after 3 attempts" in msg.last_error
    relay.stopService()
    chamber.close()


def test_a_booking_whose_hold_expires_in_an_outage_is_cancelled_not_refused(chamber_backend):
    """What a platform sees when an outage outlasts the hold (hold_seconds 60, docs/ihe-scheduling.md): the
    booking is released as documented ('cancelled', the hold expired), never 'refused'; its SRM, which never
    reached the HIS (no attempt counted), is withdrawn and no cancellation follows it; nothing is
    dead-lettered."""
    from adapters.maps.srm_booking import Hl7Header, build_srm
    from gateway.domain.booking import BookingService, HisLinkInfo
    from gateway.domain.slot_book import SlotBook
    from gateway.domain.model import BookingRequest
    from tests.unit.test_booking import PATIENT, SID, TZ, notice

    world = World()
    world.reactor.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
    chamber = Chamber(backend=chamber_backend(), clock=world.reactor.seconds)
    chamber.open()
    header = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")
    booking = BookingService(chamber, HisLinkInfo("his", "utf-8", "S04", functools.partial(build_srm, header=header)),
                             tz=TZ, hold_seconds=60, clock=world.reactor)
    chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [notice("open")]))
    relay = Relay(chamber, "his", HisDestination(world.client), booking.on_answer, clock=world.reactor,
                  ack_timeout=5, retry_initial=1, retry_max=8, max_attempts=3, max_age=600, on_dead=booking.on_dead,
                  encode=booking.encode, rng=random.Random(1))
    relay.startService()
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    _refuse_connections(world, 70)
    appt = chamber.read().appointment(appointment_id)
    assert (appt.status, appt.outcome) == ("cancelled", "the HIS did not answer in time; the hold expired")
    [srm] = [m for m in chamber.read().messages(direction="outbound")]
    assert (srm.type, srm.state, srm.attempts) == ("SRM^S01", "withdrawn", 0)
    relay.stopService()
    booking.stop()
    chamber.close()
