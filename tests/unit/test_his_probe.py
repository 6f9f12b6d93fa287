"""The active HIS probe (adapters/inner/probe.py): a connection check and an application heartbeat over a
MemoryReactorClock (iosim), the probe's up/down record on a task.Clock, what /healthz and the metrics show,
and a booking for a HIS the probe found down answered at once."""

from __future__ import annotations

import functools
import json
from datetime import datetime

from prometheus_client import generate_latest
from structlog.testing import capture_logs
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from adapters.inner.client import MLLPClient
from adapters.inner.probe import CallCheck, ConnectCheck, HeartbeatCheck, HisProbe, LinkDown
from adapters.maps.srm_booking import Hl7Header, build_heartbeat
from gateway.chamber.engine import Chamber
from gateway.ops.admin import AdminResource, Metrics
from gateway.ops.services import HisLinkRecord
from gateway.relay import Relay
from tests.deferreds import failureResultOf, successResultOf
from tests.unit.test_mllp_protocols import World, ack_for

HEADER = Hl7Header("GATEWAYD", "FRONT", "HIS", "HOSPITAL", "2.5", "utf-8")


def connect_check(world: World, timeout: float = 5.0) -> ConnectCheck:
    return ConnectCheck(TCP4ClientEndpoint(world.reactor, "127.0.0.1", 2575), clock=world.reactor,
                        timeout=timeout)


def test_the_connection_check_is_up_when_a_connection_opens_and_writes_nothing():
    world = World()
    d = connect_check(world).check()
    world.complete()
    assert successResultOf(d) is None
    assert world.received == []  # nothing was written to the HIS
    assert world.pumps[0].clientIO.disconnecting  # and the connection was closed again


def test_the_connection_check_is_down_when_refused_or_not_connected_in_time():
    world = World()
    d = connect_check(world).check()
    world.completer.failOnce(Failure(ConnectionRefusedError("HIS down")))
    assert "no connection" in str(failureResultOf(d, LinkDown).value)

    slow = connect_check(world, timeout=3.0).check()
    world.reactor.advance(2.9)
    assert not slow.called
    world.reactor.advance(0.2)
    assert str(failureResultOf(slow, LinkDown).value) == "no connection within 3s"


def heartbeat_check(world: World, timeout: float = 5.0) -> HeartbeatCheck:
    def new_client():
        return MLLPClient(world.reactor, TCP4ClientEndpoint(world.reactor, "127.0.0.1", 2575), clock=world.reactor)

    build = functools.partial(build_heartbeat, "NMQ^N01", header=HEADER, now=datetime(2030, 1, 1, 8))
    return HeartbeatCheck(new_client, lambda control_id: build(control_id=control_id), timeout=timeout)


def test_the_heartbeat_is_up_on_any_answer_with_its_control_id_and_is_never_a_gateway_control_id():
    """AR (a type the HIS does not take) still proves the application answers; the heartbeat's MSH-10 is
    P + 19 hex digits, never a gateway message's G + 19."""
    world = World(script=lambda m: [ack_for(m, "AR")])
    d = heartbeat_check(world).check()
    world.complete()
    assert successResultOf(d) is None
    [sent] = world.received
    assert sent.type_name == "NMQ^N01" and len(sent.control_id) == 20 and sent.control_id.startswith("P")
    assert [s.name for s in sent.segments] == ["MSH"]


def test_the_heartbeat_is_down_without_an_answer_in_time_or_with_another_control_id():
    silent = World(script=lambda m: [])
    d = heartbeat_check(silent, timeout=4).check()
    silent.complete()
    silent.reactor.advance(4.1)
    assert "heartbeat: AckTimeout" in str(failureResultOf(d, LinkDown).value)

    wrong = World(script=lambda m: [ack_for(m, "AA", control_id="P0")])
    d = heartbeat_check(wrong, timeout=4).check()
    wrong.complete()
    wrong.reactor.advance(4.1)
    failureResultOf(d, LinkDown)


class ScriptedCheck:
    """A link the test sets up or down (the probe's decisions are under test, not the link)."""

    def __init__(self):
        self.up = True
        self.pending: list[defer.Deferred] = []
        self.hold = False
        self.calls = 0

    def check(self):
        self.calls += 1
        if self.hold:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(None) if self.up else defer.fail(LinkDown("no connection: refused"))


def test_a_call_check_is_up_when_the_links_ping_fires_and_down_with_its_reason_otherwise():
    """The database and web-service kinds' check: their link's ping (a Deferred)."""
    assert successResultOf(CallCheck(lambda: defer.succeed(1), "database").check()) is None
    down = failureResultOf(CallCheck(lambda: defer.fail(TimeoutError("no answer within 5s")), "web service").check(),
                           LinkDown)
    assert str(down.value) == "web service: TimeoutError: no answer within 5s"

    def cannot_start():
        raise RuntimeError("the link is stopped")
    stopped = failureResultOf(CallCheck(cannot_start, "database").check(), LinkDown)  # down, not a crashed probe
    assert str(stopped.value) == "database: RuntimeError: the link is stopped"


def test_the_probe_checks_at_start_and_every_interval_and_reports_changes_only():
    clock = task.Clock()
    clock.advance(1000)
    link, changes = ScriptedCheck(), []
    probe = HisProbe("his", [link], interval=30, clock=clock, on_change=lambda *a: changes.append(a))
    probe.startService()
    assert link.calls == 1 and changes == [(True, 1000, None)]
    clock.advance(30)
    assert link.calls == 2 and changes == [(True, 1000, None)]  # no change, nothing reported
    link.up = False
    with capture_logs() as logs:
        clock.advance(30)
    assert changes[-1] == (False, 1060, "no connection: refused")
    assert [e["event"] for e in logs] == ["his.probe.down"] and logs[0]["peer"] == "his"
    clock.pump([1] * 15)  # down: checked again every second (RECHECK), not every 30 s
    status = probe.status()
    assert (status["up"], status["since"], status["for_seconds"], status["checked"]) == (False, 1060, 15, 1075)
    assert link.calls == 18 and len(changes) == 2
    link.up = True
    clock.advance(1)
    assert changes[-1] == (True, 1076, None) and len(changes) == 3
    clock.advance(30)  # up again: every 30 s
    assert link.calls == 20
    probe.stopService()
    clock.advance(300)
    assert link.calls == 20  # stopped: no more checks


def test_a_slow_check_is_not_doubled_and_a_restart_keeps_the_recorded_state():
    clock = task.Clock()
    link, changes = ScriptedCheck(), []
    link.hold = True
    probe = HisProbe("his", [link], interval=10, clock=clock, on_change=lambda *a: changes.append(a),
                     known=lambda: (False, -500.0))
    probe.startService()
    clock.advance(25)  # two intervals pass while the first check hangs
    assert link.calls == 1 and probe.status()["up"] is False and probe.status()["since"] == -500.0
    link.pending[0].errback(LinkDown("no connection within 5s"))
    assert changes == []  # it was down before the restart, and still is: no change
    assert probe.status()["last_error"] == "no connection within 5s"
    probe.stopService()


def health(admin) -> tuple[int, dict]:
    request = DummyRequest([b"healthz"])
    request.path = b"/healthz"
    body = admin.render_GET(request)
    return request.responseCode or 200, json.loads(body)


def metric(metrics, name: str) -> float | None:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_an_idle_outage_the_probe_finds_shows_in_health_metrics_and_the_chamber(chamber_backend):
    """Nothing is sent; the probe's failed check alone turns /healthz 503 (reachable false, the probe's reason),
    gatewayd_his_up 0 and the outage gauge counting, and the chamber's his_links row down (what the outer gate
    and `gatewayd status` read); back up, all of it clears."""
    clock = task.Clock()
    clock.advance(5000)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    metrics = Metrics(chamber)
    relay = Relay(chamber, "his", ScriptedHisLane(), lambda *a: None, clock=clock, ack_timeout=5, retry_initial=1,
                  retry_max=8, metrics=metrics)
    record, link = HisLinkRecord(chamber, "his"), ScriptedCheck()
    probe = HisProbe("his", [link], interval=30, clock=clock, on_change=record.record, known=record.known)
    metrics.watch_probe("his", probe.status)
    admin = AdminResource(chamber, metrics, [relay], {"his": probe})
    relay.startService()
    probe.startService()
    assert health(admin)[0] == 200 and metric(metrics, "gatewayd_his_up") == 1
    link.up = False
    clock.advance(30)
    clock.pump([1] * 12)
    code, body = health(admin)
    assert code == 503 and body["his"]["his"]["reachable"] is False
    assert body["his"]["his"]["probe"]["last_error"] == "no connection: refused"
    assert metric(metrics, "gatewayd_his_up") == 0
    assert metric(metrics, "gatewayd_his_unreachable_seconds") == 12
    row = chamber.read().his_links()["his"]
    assert (row.up, row.since, row.detail) == (False, 5030, "no connection: refused")
    link.up = True
    clock.advance(1)
    assert health(admin)[0] == 200 and metric(metrics, "gatewayd_his_unreachable_seconds") == 0
    assert chamber.read().his_links()["his"].up is True
    probe.stopService()
    relay.stopService()
    chamber.close()


class ScriptedHisLane:
    def deliver(self, body, control_id, timeout):
        return defer.Deferred()

    def close(self):
        return defer.succeed(None)


def test_a_booking_for_a_his_the_probe_found_down_is_answered_at_once(chamber_backend):
    """wait_settled fires False at once (the platform's 202) when the booking's SRM waits for an endpoint the
    probe found down; the same booking waits as usual once the HIS is up again."""
    from adapters.maps.srm_booking import build_srm
    from gateway.domain.booking import BookingService, HisLinkInfo
    from gateway.domain.model import BookingRequest
    from gateway.domain.slot_book import SlotBook
    from tests.unit.test_booking import PATIENT, SID, TZ, notice

    clock = task.Clock()
    clock.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    booking = BookingService(chamber, HisLinkInfo("his", "utf-8", "S04", functools.partial(build_srm, header=HEADER)),
                             tz=TZ, hold_seconds=600, clock=clock)
    chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [notice("open")]))
    appointment_id = successResultOf(booking.book("demo", BookingRequest(SID, PATIENT)))[0]
    successResultOf(HisLinkRecord(chamber, "his").record(False, clock.seconds(), "no connection: refused"))
    assert successResultOf(booking.wait_settled(appointment_id, 30)) is False  # no clock advanced
    successResultOf(HisLinkRecord(chamber, "his").record(True, clock.seconds(), None))
    waiting = booking.wait_settled(appointment_id, 30)
    assert not waiting.called
    clock.advance(30)
    assert successResultOf(waiting) is False
    booking.stop()
    chamber.close()


OUTER_ONLY = """
outer:
  tls: {certificate: certs/server.pem, private_key: certs/server.key, client_ca: certs/ca.pem}
platforms: [{name: demo, certificate_subject: CN=platform-demo}]
"""


def test_a_heartbeat_must_be_allowed_out_and_needs_the_probe(config_dir):
    """Refused with file:line:key: a heartbeat send_types does not allow, one without a probe, a malformed type."""
    from tests.unit.config_files import load, problems

    found = problems(config_dir, "inner:\n  his:\n    host: h\n    port: 1\n    heartbeat: NMQ^N01\n"
                                 "    probe_interval: 0s\n", head=OUTER_ONLY)
    assert found == ["9:inner.his.heartbeat: the heartbeat sends NMQ^N01: allow it in send_types",
                     "9:inner.his.heartbeat: a heartbeat is sent by the probe: set probe_interval above 0"]
    assert [p.split(": ")[0] for p in problems(config_dir, "inner:\n  his:\n    host: h\n    port: 1\n"
                                                            "    heartbeat: NMQ\n", head=OUTER_ONLY)] \
        == ["9:inner.his.heartbeat"]
    his = load(config_dir, "inner:\n  his:\n    host: h\n    port: 1\n", head=OUTER_ONLY).inner.his
    assert (his.probe_interval, his.heartbeat) == (30.0, None)  # the defaults: a connection check every 30 s


def test_an_answer_the_relay_gets_shows_the_link_up_before_the_next_check():
    """A HIS that came back is shown up by the first answer the relay's (or the poller's) MLLP client reads,
    not only at the next check."""
    from adapters.inner.his import HisDestination
    from tests.unit.test_mllp_protocols import siu

    world = World()
    link, changes = ScriptedCheck(), []
    link.up = False
    probe = HisProbe("his", [link], interval=300, clock=world.reactor, on_change=lambda *a: changes.append(a),
                     recheck=300)
    probe.startService()
    world.reactor.advance(10)
    world.client.on_answer = probe.answered
    d = HisDestination(world.client).deliver(siu("G1"), "G1", 5)
    world.complete()
    assert successResultOf(d).code == "AA"
    assert [c[0] for c in changes] == [False, True] and probe.status()["up"] is True
    assert link.calls == 1
    probe.stopService()


def test_a_message_from_a_his_whose_link_is_down_has_it_checked_at_once():
    """A HIS that starts or comes back usually speaks first: its message has the link checked now, not at the
    next check; at most one check per 0.2 s however much it sends, and none while the link is up."""
    clock = task.Clock()
    link = ScriptedCheck()
    link.up = False
    probe = HisProbe("his", [link], interval=30, clock=clock, recheck=30)
    probe.startService()
    assert link.calls == 1 and probe.status()["up"] is False
    link.up = True
    clock.advance(0.05)
    probe.heard()
    probe.heard()
    assert link.calls == 1  # the last check was just now: the next one 0.2 s after it
    clock.advance(0.15)
    probe.heard()
    assert link.calls == 2 and probe.status()["up"] is True
    clock.advance(1)
    probe.heard()
    assert link.calls == 2  # up: nothing to check
    probe.stopService()


def test_a_message_heard_during_a_failing_check_has_the_link_checked_again():
    """The HIS may start listening while a check that fails is under way: its message, heard meanwhile, has the
    link checked again right after (0.2 s after the last check), not at the next interval."""
    clock = task.Clock()
    link = ScriptedCheck()
    link.hold = True
    probe = HisProbe("his", [link], interval=30, clock=clock, recheck=30)
    probe.startService()
    clock.advance(0.5)
    probe.heard()
    link.hold, link.up = False, True
    link.pending[0].errback(LinkDown("no connection: refused"))
    assert probe.status()["up"] is False and link.calls == 1
    clock.advance(0.2)
    assert link.calls == 2 and probe.status()["up"] is True
    probe.stopService()


def test_the_outer_gates_health_shows_what_the_inner_gates_probe_recorded(chamber_backend):
    """The split lock's outer process has no relay: its /healthz adds the probe's record from the chamber (why a
    booking is answered 202 at once) without turning unhealthy for it."""
    clock = task.Clock()
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    admin = AdminResource(chamber, Metrics(chamber))
    assert health(admin) == (200, {"chamber": "ok", "his": {}, "his_recorded": {}, "status": "ok"})
    successResultOf(HisLinkRecord(chamber, "his").record(False, 12.0, "no connection: refused"))
    code, body = health(admin)
    assert code == 200 and body["his_recorded"] == {"his": {"up": False, "since": 12.0,
                                                            "detail": "no connection: refused"}}
    chamber.close()

