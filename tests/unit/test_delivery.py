"""The outer gate's deliveries (adapters/outer/delivery.py) on a real chamber with a task.Clock and an agent that
answers as a test says: one subscription's notifications in order, backoff after failures, dead letter after
give_up_after, one subscription's stalled endpoint holding up no other, and the signature."""

import base64
import hashlib
import json
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from twisted.internet import defer, task

from adapters.outer.delivery import Delivery, Hook, SignerError, load_signer
from gateway.chamber.engine import Chamber
from tests.deferreds import successResultOf


class Agent:
    """Records each request; the test fires its Deferred with a response code or a failure."""

    def __init__(self):
        self.requests = []

    def request(self, method, url, headers, producer):
        d = defer.Deferred()
        self.requests.append((url, headers, producer, d))
        return d

    def answer(self, i, code, body=()):
        self.requests[i][3].callback(SimpleNamespace(code=code, phrase=b"",
                                                     deliverBody=lambda protocol: _empty(protocol, body)))


def _empty(protocol, chunks=()):
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone

    for chunk in chunks:
        protocol.dataReceived(chunk)
    protocol.connectionLost(Failure(ResponseDone()))


def hook(agent, **cfg):
    h = Hook.__new__(Hook)
    h.cfg = SimpleNamespace(**{"timeout": 10.0, "retry_first": 1.0, "retry_max": 8.0, "give_up_after": 60.0, **cfg})
    h.url = b"https://hook.example/x"
    h.signer = SimpleNamespace(sign=lambda body: "h..s")
    h.agent = agent
    return h


@pytest.fixture
def env(chamber_backend):
    """(once on each chamber backend: tests/conftest.py)"""
    clock = task.Clock()
    clock.advance(1_900_000_000)
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    agents = {"demo": Agent(), "slow": Agent()}
    delivery = Delivery(chamber, clock, {p: hook(a) for p, a in agents.items()},
                        lambda sub, n: {"sub": sub.id, "event": n.event})
    delivery.startService()
    yield chamber, clock, agents, delivery
    delivery.stopService()
    chamber.close()


def notify(chamber, sub, platform, n=1):
    def work(tx):
        if tx.subscription(sub) is None:
            tx.add_subscription(id=sub, platform=platform, topic="appointment-status", payload="id-only")
        for _ in range(n):
            tx.add_notification(sub, platform=platform, focus="Appointment/a1", what="cancelled")

    chamber.transact_now(work)


def states(chamber, sub):
    return [(n.event, n.state, n.attempts) for n in chamber.read().notifications_of(sub)]


def sent_events(agent):
    return [json.loads(r[2]._inputFile.getvalue())["event"] for r in agent.requests]


def test_a_subscriptions_notifications_go_one_at_a_time_in_order(env):
    chamber, clock, agents, delivery = env
    notify(chamber, "s1", "demo", n=3)
    delivery.wake()
    clock.advance(0)
    assert sent_events(agents["demo"]) == [1]  # the second waits for the first
    agents["demo"].answer(0, 204, [b"x" * 65536] * 64)  # an answer's body is read and dropped, whatever its size
    clock.advance(0)
    agents["demo"].answer(1, 200)
    clock.advance(0)
    agents["demo"].answer(2, 200)
    clock.advance(0)
    assert sent_events(agents["demo"]) == [1, 2, 3]
    assert states(chamber, "s1") == [(1, "delivered", 1), (2, "delivered", 1), (3, "delivered", 1)]


def test_failures_back_off_then_the_notification_is_dead_and_the_next_goes(env):
    chamber, clock, agents, delivery = env
    notify(chamber, "s1", "demo", n=2)
    delivery.wake()
    clock.advance(0)
    waits = []
    for i in range(20):
        agents["demo"].answer(i, 503)
        clock.advance(0)
        row = chamber.read().notification("s1", 1)
        if row.state == "dead":
            break
        waits.append(row.next_attempt - clock.seconds())
        clock.advance(waits[-1])
    assert waits[:5] == [1.0, 2.0, 4.0, 8.0, 8.0]  # retry_first, doubled, up to retry_max
    assert sum(waits) >= 60 - 8  # given up only past give_up_after
    row = chamber.read().notification("s1", 1)
    assert row.state == "dead" and row.last_error == "answered 503"
    assert sent_events(agents["demo"])[-1] == 2  # the subscription goes on with the next
    from gateway.ops.admin import ChamberCollector

    (family,) = [f for f in ChamberCollector(chamber).collect() if f.name == "gatewayd_notifications"]
    assert {tuple(sample.labels.values()): sample.value for sample in family.samples} == {
        ("demo", "dead"): 1, ("demo", "pending"): 1}  # what an operator sees


def test_a_stalled_endpoint_holds_up_no_other_platform(env):
    chamber, clock, agents, delivery = env
    notify(chamber, "slow-sub", "slow", n=2)
    notify(chamber, "s1", "demo", n=2)
    delivery.wake()
    clock.advance(0)
    assert sent_events(agents["slow"]) == [1]  # never answered
    agents["demo"].answer(0, 200)
    clock.advance(0)
    agents["demo"].answer(1, 200)
    clock.advance(0)
    assert [s for _, s, _ in states(chamber, "s1")] == ["delivered", "delivered"]
    assert [s for _, s, _ in states(chamber, "slow-sub")] == ["pending", "pending"]


def test_the_signature_is_a_detached_jws_by_the_client_key(tmp_path):
    from gateway.ops.devca import init_dev_ca

    paths = init_dev_ca(tmp_path)
    signer = load_signer(paths["platform-demo"], paths["platform-demo_key"])
    body = '{"resourceType":"Bundle","x":"心"}'.encode()
    header_b64, empty, sig_b64 = signer.sign(body).split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    header = json.loads(base64.urlsafe_b64decode(pad(header_b64)))
    cert = x509.load_pem_x509_certificate(paths["platform-demo"].read_bytes())
    from cryptography.hazmat.primitives.serialization import Encoding

    assert empty == "" and header["alg"] == "ES256"
    assert base64.urlsafe_b64decode(pad(header["x5t#S256"])) == hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
    raw = base64.urlsafe_b64decode(pad(sig_b64))
    signed = f"{header_b64}.{base64.urlsafe_b64encode(body).rstrip(b'=').decode()}".encode()
    cert.public_key().verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
                             signed, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(Exception):
        cert.public_key().verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
                                 signed + b"x", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(SignerError, match="does not belong"):
        load_signer(paths["platform-demo"], paths["server_key"])


def test_a_reload_applies_a_platforms_new_notify(config_dir):
    """SIGHUP: the new endpoint is where the next delivery goes and what a Subscription shows (no restart)."""
    from twisted.internet.testing import MemoryReactorClock

    from gateway.ops.reload import reload
    from gateway.service import make_service
    from tests.unit.config_files import HEAD, load

    notify = ("platforms:\n  - name: demo\n    certificate_subject: CN=platform-demo\n    notify:\n"
              "      endpoint: {}\n      ca: certs/ca.pem\n      client_certificate: certs/platform-demo.pem\n"
              "      client_key: certs/platform-demo.key\n")
    head = HEAD + f"chamber: {{path: {config_dir / 'c.sqlite3'}}}\n"
    first = load(config_dir, notify.format("https://old.example/h"), head)
    gateway = make_service(first, MemoryReactorClock())
    assert gateway.delivery.hooks["demo"].url == b"https://old.example/h"
    applied = reload(gateway, load(config_dir, notify.format("https://new.example/h"), head))
    assert not [a for a in applied if a.startswith("needs a restart")], applied
    assert gateway.delivery.hooks["demo"].url == b"https://new.example/h"
    assert gateway.api.subscriptions.notify["demo"].endpoint == "https://new.example/h"


def test_the_handshake_goes_first_and_heartbeats_come_when_nothing_else_does(env):
    """A subscription made through the domain has its handshake (event 0) delivered before its events; one with a
    heartbeat period gets a heartbeat after that long without a delivery, and none while deliveries flow."""
    from gateway.domain.notifications import Subscriptions

    chamber, clock, agents, delivery = env
    delivery.body = lambda sub, n: {"kind": "heartbeat" if n is None else n.what, "event": n and n.event}
    sub = successResultOf(Subscriptions(chamber).subscribe("demo", "appointment-status", "id-only", 5, heartbeat=30))
    chamber.transact_now(lambda tx: tx.add_notification(sub.id, platform="demo", focus="Appointment/a1",
                                                        what="cancelled"))
    delivery.wake()
    clock.advance(0)
    agents["demo"].answer(0, 200)
    clock.advance(0)
    agents["demo"].answer(1, 200)
    clock.advance(29)
    assert [json.loads(r[2]._inputFile.getvalue())["kind"] for r in agents["demo"].requests] == ["handshake",
                                                                                                  "cancelled"]
    clock.advance(1)
    kinds = [json.loads(r[2]._inputFile.getvalue())["kind"] for r in agents["demo"].requests]
    assert kinds == ["handshake", "cancelled", "heartbeat"]
    assert [n.event for n in chamber.read().notifications_of(sub.id)] == [1]  # ($events: the handshake is not one)
    agents["demo"].answer(2, 500)  # a failed heartbeat is not retried: the next comes a period later
    clock.advance(29)
    assert len(agents["demo"].requests) == 3
    clock.advance(1)
    assert len(agents["demo"].requests) == 4


def test_a_subscription_is_requested_until_its_handshake_is_answered_then_active_or_error(env):
    """Backport IG: requested until the handshake gets a 2xx, then active; a failed handshake shows error (while
    it is retried, and once it is dead) until the endpoint takes one of its deliveries."""
    from gateway.domain.notifications import Subscriptions, subscription_status

    chamber, clock, agents, delivery = env
    status = lambda sub_id: subscription_status(chamber.read(), chamber.read().subscription(sub_id))  # noqa: E731
    subs = Subscriptions(chamber)
    ok = successResultOf(subs.subscribe("demo", "appointment-status", "id-only", 5))
    assert status(ok.id) == "requested"
    clock.advance(0)
    agents["demo"].answer(0, 503)
    clock.advance(0)
    assert status(ok.id) == "error"
    clock.advance(1)
    agents["demo"].answer(1, 204)
    clock.advance(0)
    assert status(ok.id) == "active"

    failing = successResultOf(subs.subscribe("slow", "appointment-status", "id-only", 5))
    for i in range(8):  # past give_up_after (60 s): the handshake is dead
        clock.advance(10)
        if i < len(agents["slow"].requests) and not agents["slow"].requests[i][3].called:
            agents["slow"].answer(i, 500)
    assert chamber.read().notification(failing.id, 0).state == "dead"
    assert status(failing.id) == "error"
    chamber.transact_now(lambda tx: tx.add_notification(failing.id, platform="slow", focus="Appointment/a1",
                                                        what="cancelled"))
    delivery.wake()
    clock.advance(0)
    agents["slow"].answer(len(agents["slow"].requests) - 1, 200)
    clock.advance(0)
    assert status(failing.id) == "active"  # the endpoint works again
    successResultOf(subs.unsubscribe("slow", failing.id))
    assert status(failing.id) == "off"


def test_a_full_resource_delivery_is_audited_with_each_attempts_outcome(env):
    """The resource a notification carries leaves the hospital: each attempt is an audit record (action notify,
    the platform, the resource, the answer's status; 502 when none came); an id-only one carries none."""
    chamber, clock, agents, delivery = env
    delivery.body = lambda sub, n: {"entry": [{"resource": {}}] + (
        [{"resource": {"resourceType": "Appointment"}, "request": {"method": "PUT", "url": "Appointment/a1"}}]
        if n.event == 1 else [])}
    notify(chamber, "s1", "demo", n=2)
    clock.advance(0)
    agents["demo"].requests[0][3].errback(ConnectionRefusedError())
    clock.advance(1)
    agents["demo"].answer(1, 200)
    clock.advance(0)
    agents["demo"].answer(2, 200)  # event 2: no resource carried
    clock.advance(0)
    records = [(r.action, r.platform, r.resource_type, r.resource_id, r.outcome)
               for r in chamber.read().audit_records()]
    assert records == [("notify", "demo", "Appointment", "a1", 502), ("notify", "demo", "Appointment", "a1", 200)]


def test_what_the_configuration_withdraws_ends_its_subscriptions_and_dead_letters_their_pending(tmp_path):
    """A platform that lost a topic's scope, or its notify endpoint (or was removed), stops receiving: its
    subscriptions to what it may no longer have end (off), their pending notifications are dead-lettered with
    the reason — none stays pending; what it still may have goes on."""
    from gateway.domain.notifications import withdraw

    chamber = Chamber(tmp_path / "c.sqlite3", clock=lambda: 1_900_000_000.0)
    chamber.open()
    try:
        for sub, platform, topic in (("a", "demo", "appointment-status"), ("f", "demo", "free-slot"),
                                     ("o", "other", "appointment-status")):
            chamber.transact_now(lambda tx: tx.add_subscription(id=sub, platform=platform, topic=topic,
                                                                payload="id-only"))
            chamber.transact_now(lambda tx: tx.add_notification(sub, platform=platform, focus="Appointment/x",
                                                                what="cancelled"))
        ended = chamber.transact_now(lambda tx: withdraw(tx, {"demo": frozenset({"Slot.read"})}))
        assert sorted((s, dead) for _, s, _, dead in ended) == [("a", 1), ("o", 1)]
        reader = chamber.read()
        assert [reader.subscription(s).status for s in "afo"] == ["off", "active", "off"]
        a, o = reader.notification("a", 1), reader.notification("o", 1)
        assert a.state == "dead" and "no longer granted the scope Appointment.read" in a.last_error
        assert o.state == "dead" and "no notify endpoint" in o.last_error
        assert reader.notification("f", 1).state == "pending"
        assert chamber.transact_now(lambda tx: withdraw(tx, {"demo": frozenset({"Slot.read"})})) == []
    finally:
        chamber.close()


def test_a_reload_that_removes_a_platforms_notify_ends_its_subscriptions(config_dir):
    from twisted.internet.testing import MemoryReactorClock

    from gateway.ops.reload import reload
    from gateway.service import make_service
    from tests.unit.config_files import HEAD, load

    platform = ("platforms:\n  - name: demo\n    certificate_subject: CN=platform-demo\n{}")
    notify = ("    notify:\n      endpoint: https://hook.example/h\n      ca: certs/ca.pem\n"
              "      client_certificate: certs/platform-demo.pem\n      client_key: certs/platform-demo.key\n")
    head = HEAD + f"chamber: {{path: {config_dir / 'c.sqlite3'}}}\n"
    gateway = make_service(load(config_dir, platform.format(notify), head), MemoryReactorClock())
    chamber = gateway.booking.chamber
    chamber.open()
    try:
        chamber.transact_now(lambda tx: tx.add_subscription(id="s1", platform="demo", topic="appointment-status",
                                                            payload="id-only", handshake=True))
        reload(gateway, load(config_dir, platform.format(""), head))
        for _ in range(5):
            gateway.reactor.advance(0.1)
        assert chamber.read().subscription("s1").status == "off"
        assert chamber.read().notification("s1", 0).state == "dead"
    finally:
        chamber.close()
