"""Issue 23's "Done when", end to end: platforms subscribe, the HIS simulator suspends a doctor's clinic (停诊),
and each platform's webhook — a real HTTPS server here, with its own certificate from its own CA, asking for the
gateway's client certificate — receives every cancellation of its own patients' appointments, in order, signed;
the webhook is down for 30 s and catches up (retries, and $events says the same); a stalled webhook does not slow
the inner gate's ACKs; kill -9 of the gateway while a delivery is in flight loses no notification."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from adapters.hl7.er7 import parse
from gateway.ops.devca import init_dev_ca, issue_client_cert
from tests.e2e.harness import Lock, Proc, appointment_for, eventually, free_port, mllp_exchange

JSON = {"Content-Type": "application/fhir+json"}
TOPIC = "https://gatewayd.invalid/fhir/SubscriptionTopic/appointment-status"
FREE_SLOTS = "https://gatewayd.invalid/fhir/SubscriptionTopic/free-slot"
PAYLOAD_CONTENT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
DOWN = 30.0  # how long the webhook is down (the issue's "Done when")


class Webhook:
    """A platform's HTTPS webhook: its own CA and server certificate; it asks for a client certificate signed by
    the gateway's CA.  ``received``: (path, headers, body bytes, client certificate DER) of each POST it answered
    200; ``stall`` (an Event, set: answer) holds the answers back; ``down()`` / ``up()`` close and reopen it."""

    def __init__(self, directory, client_ca):
        paths = init_dev_ca(directory, platforms=())
        self.ca = str(paths["ca"])
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(paths["server"], paths["server_key"])
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(client_ca)
        self.port = free_port()
        self.received: list[tuple[str, dict, bytes, bytes]] = []
        self.attempts = 0
        self.answering = threading.Event()
        self.answering.set()
        self.server = None
        self.up()

    def up(self):
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                hook.answering.wait(60)
                hook.received.append((self.path, dict(self.headers), body, self.connection.getpeercert(True)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.socket = self.context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self):
        self.server.shutdown()
        self.server.server_close()

    def url(self, path):
        return f"https://127.0.0.1:{self.port}/{path}"

    def kinds(self, path):
        """The SubscriptionStatus type of each Bundle delivered to ``path`` (handshake, event-notification, ...)."""
        return [{p["name"]: p for p in json.loads(body)["entry"][0]["resource"]["parameter"]}["type"]["valueCode"]
                for p_, _, body, _ in list(self.received) if p_ == f"/{path}"]

    def events(self, path):
        """(event number, change, focus) of every notification-event delivered to ``path``, in arrival order."""
        out = []
        for p, _, body, _ in list(self.received):
            if p != f"/{path}":
                continue
            status = json.loads(body)["entry"][0]["resource"]
            for param in status["parameter"]:
                if param["name"] == "notification-event":
                    parts = {q["name"]: q for q in param["part"]}
                    out.append((int(parts["event-number"]["valueString"]), param["extension"][0]["valueCode"],
                                parts["focus"]["valueReference"]["reference"].rsplit("/", 2)[-1]))
        return out


def verify_signature(headers: dict, body: bytes, certificate_der: bytes) -> None:
    """X-Gatewayd-Signature: a JWS (ES256) with a detached payload over the body, by the key of the certificate
    the gateway presented (named by x5t#S256)."""
    header_b64, empty, signature_b64 = headers["X-Gatewayd-Signature"].split(".")
    assert empty == ""
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    header = json.loads(base64.urlsafe_b64decode(pad(header_b64)))
    assert header["alg"] == "ES256"
    assert base64.urlsafe_b64decode(pad(header["x5t#S256"])) == hashlib.sha256(certificate_der).digest()
    raw = base64.urlsafe_b64decode(pad(signature_b64))
    signing_input = f"{header_b64}.{base64.urlsafe_b64encode(body).rstrip(b'=').decode()}".encode()
    key = x509.load_der_x509_certificate(certificate_der).public_key()
    key.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
               signing_input, ec.ECDSA(hashes.SHA256()))


def subscribe(lock, platform, payload, topic=TOPIC):
    r = lock.session(platform).post(f"{lock.base}/Subscription", headers=JSON, json={
        "resourceType": "Subscription", "status": "requested", "reason": "appointments", "criteria": topic,
        "channel": {"type": "rest-hook", "payload": "application/fhir+json",
                    "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": payload}]}}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def book(lock, platform, slot_id, mrn):
    r = lock.session(platform).post(f"{lock.base}/Appointment", json=appointment_for(slot_id, mrn), headers=JSON)
    assert r.status_code == 201 and r.json()["status"] == "booked", r.text
    return r.json()["id"]


def siu_open(n: int) -> bytes:
    """An SIU^S24 publishing a slot of another doctor (nothing of a platform's): what the ACK latency is measured on."""
    start = f"20301010{8 + n // 4:02d}{(n % 4) * 15:02d}"
    return ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^S24^SIU_S12|LAT-%d|P|2.5\r"
            "SCH|||||D099^x||||15|MIN|^^15^%s^%s|||||||||||||Open\r"
            "RGS|1\rAIS|1||x^y|%s|||15|MIN\r" % (n, start, start, start)).encode()


@pytest.fixture
def lock(tmp_path):
    lock = Lock(tmp_path, platforms=("demo", "other", "gateway"))  # platform-gateway.pem: the gateway's client cert
    hook = Webhook(tmp_path / "webhook", str(lock.certs / "ca.pem"))
    for p in lock.gateway_config["platforms"]:
        p["notify"] = {"endpoint": hook.url(p["name"]), "ca": hook.ca,
                       "client_certificate": "certs/platform-gateway.pem", "client_key": "certs/platform-gateway.key",
                       "retry_first": "200ms", "retry_max": "2s", "timeout": "20s"}
    lock.write_configs()
    lock.hook = hook
    lock.start_gateway()
    lock.sim = Proc("his-sim", ["his-sim", "--config", "his-sim.yaml", "--suspend-file", "suspend.txt"], lock.workdir)
    try:
        eventually(lambda: len(lock.search_slots()) >= lock.slot_count, timeout=30, what="the HIS's slots")
        yield lock
    finally:
        lock.stop()
        hook.down()


def suspend(lock, doctor, day):
    (lock.workdir / "suspend.txt").write_text(f"{doctor} {day.isoformat()}\n", encoding="utf-8")
    lock.sim.popen.send_signal(signal.SIGHUP)


def test_a_suspended_clinic_reaches_each_platform_in_order_and_nothing_is_lost(lock):
    hook = lock.hook
    demo_sub, other_sub = subscribe(lock, "demo", "id-only"), subscribe(lock, "other", "full-resource")
    subscribe(lock, "gateway", "id-only", FREE_SLOTS)  # a third platform follows the free slots
    day = lock.first_day
    d001 = sorted((s for s in lock.search_slots(schedule="Schedule/D001", status="free")
                   if s["start"].startswith(day.isoformat())), key=lambda s: s["start"])
    demo_appts = [book(lock, "demo", d001[i]["id"], f"MRN-D{i}") for i in range(2)]
    other_appts = [book(lock, "other", d001[2]["id"], "MRN-O0")]
    eventually(lambda: len(hook.events("demo")) == 2 and len(hook.events("other")) == 1, timeout=20,
               what="the three bookings notified")

    # -- the clinic is suspended: each platform hears of exactly its own cancellations, in order ---------------
    suspend(lock, "D001", day)
    eventually(lambda: len(hook.events("demo")) == 4 and len(hook.events("other")) == 2, timeout=30,
               what="the cancellations delivered")
    assert hook.events("demo") == [(1, "booked", demo_appts[0]), (2, "booked", demo_appts[1]),
                                   (3, "cancelled", demo_appts[0]), (4, "cancelled", demo_appts[1])]
    assert hook.events("other") == [(1, "booked", other_appts[0]), (2, "cancelled", other_appts[0])]
    assert hook.kinds("demo") == ["handshake"] + ["event-notification"] * 4
    for path, headers, body, cert in hook.received:
        verify_signature(headers, body, cert)
        bundle = json.loads(body)
        assert bundle["type"] == "history"
        if path == "/other" and bundle["entry"][0]["resource"]["parameter"][3]["valueCode"] != "handshake":
            # full-resource: its own appointment, as it is now
            (appt,) = [e["resource"] for e in bundle["entry"][1:]]
            assert appt["resourceType"] == "Appointment" and appt["id"] in other_appts
        else:
            assert len(bundle["entry"]) == 1
    # the free-slot subscriber: the three bookings took their slots, then the suspension blocked every slot of
    # the day (a cancelled booking's slot freed and blocked in the same push), each in order, numbered
    day_slots = {s["id"] for s in d001}
    eventually(lambda: {f for _, what, f in hook.events("gateway") if what == "blocked"} >= day_slots, timeout=30,
               what="the day's slots notified blocked to the free-slot subscriber")
    slot_events = hook.events("gateway")
    assert [e for e, _, _ in slot_events] == list(range(1, len(slot_events) + 1))
    assert [(what, f) for _, what, f in slot_events[:3]] == [("taken", d001[i]["id"]) for i in range(3)]
    last = {f: what for _, what, f in slot_events}
    assert all(last[f] == "blocked" for f in day_slots)
    demo_cancelled = [json.loads(b) for p, _, b, _ in hook.received if p == "/demo"][-1]
    assert "MRN-O0" not in json.dumps(demo_cancelled) and other_appts[0] not in json.dumps(demo_cancelled)

    # -- the webhook is down for 30 s: retries, then it catches up with nothing lost ----------------------------
    hook.down()
    d002 = sorted((s for s in lock.search_slots(schedule="Schedule/D002", status="free")
                   if s["start"].startswith(day.isoformat())), key=lambda s: s["start"])
    late = [book(lock, "demo", d002[i]["id"], f"MRN-L{i}") for i in range(2)]
    suspend(lock, "D002", day)
    time.sleep(DOWN)
    retried = lock.chamber_rows("SELECT event, attempts, state FROM notifications WHERE subscription_id = ?"
                                " AND event > 4 ORDER BY event", demo_sub)
    assert [e for e, _, _ in retried] == [5, 6, 7, 8] and retried[0][1] >= 3 and retried[0][2] == "pending", retried
    hook.up()
    eventually(lambda: len(hook.events("demo")) == 8, timeout=30, what="the catch-up after the outage")
    assert hook.events("demo")[4:] == [(5, "booked", late[0]), (6, "booked", late[1]),
                                       (7, "cancelled", late[0]), (8, "cancelled", late[1])]
    events = lock.session("demo").get(f"{lock.base}/Subscription/{demo_sub}/$events",
                                      params={"eventsSinceNumber": 1}).json()
    numbers = [int(p["part"][0]["valueString"]) for p in events["entry"][0]["resource"]["parameter"]
               if p["name"] == "notification-event"]
    assert numbers == list(range(1, 9))
    assert lock.session("other").get(f"{lock.base}/Subscription/{demo_sub}/$events").status_code == 404


def test_a_stalled_webhook_does_not_slow_the_acks_and_kill_9_loses_nothing(lock):
    hook = lock.hook
    demo_sub = subscribe(lock, "demo", "id-only")
    slots = sorted(lock.search_slots(schedule="Schedule/D001", status="free"), key=lambda s: s["start"])
    hook.answering.clear()  # the webhook takes each request and does not answer
    first = book(lock, "demo", slots[0]["id"], "MRN-S0")
    eventually(lambda: hook.attempts >= 1, timeout=10, what="the delivery in flight")

    # the inner gate's ACKs while the webhook stalls: each SIU is answered as fast as without it
    latencies = []
    for n in range(20):
        started = time.monotonic()
        ack = parse(mllp_exchange(lock.mllp_port, siu_open(n)))
        latencies.append(time.monotonic() - started)
        assert ack.segment("MSA").get(1) == "AA"
    latencies.sort()
    print(f"SIU ACK latency while the webhook stalls: median {latencies[10] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")
    assert latencies[-1] < 5.0  # the stall holds the delivery for 60 s; not one ACK waited for it

    # kill -9 while the delivery is in flight (and a second notification waits behind it): after the restart
    # both arrive, in order (the first perhaps twice: at least once, the same event number)
    second = book(lock, "demo", slots[1]["id"], "MRN-S1")
    lock.gateway.popen.send_signal(signal.SIGKILL)
    lock.gateway.popen.wait()
    lock.gateway.stop()
    hook.answering.set()
    lock.start_gateway()
    eventually(lambda: {e for e, _, _ in hook.events("demo")} == {1, 2}, timeout=30,
               what="both notifications after the restart")
    delivered = [e for e, _, _ in hook.events("demo")]
    assert sorted(set(delivered)) == [1, 2] and delivered == sorted(delivered)
    assert dict((e, f) for e, _, f in hook.events("demo")) == {1: first, 2: second}
    assert lock.chamber_rows("SELECT event, state FROM notifications WHERE subscription_id = ? ORDER BY event",
                             demo_sub) == [(0, "delivered"), (1, "delivered"), (2, "delivered")]  # 0: handshake
