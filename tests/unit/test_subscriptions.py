"""The Subscription endpoints (issue 23): a platform subscribes to a topic with its own configured endpoint only,
reads, deletes and catches up ($status, $events) on its own subscriptions only; what it asks and the gateway
does not honour is refused, never ignored."""

from datetime import timedelta
from types import SimpleNamespace

import pytest

from adapters.maps.fhir_subscriptions import BACKPORT, HEARTBEAT_PERIOD, PAYLOAD_CONTENT
from adapters.outer.intake import JsonLimits
from adapters.outer.subscriptions import SubscriptionsApi, focus_resource
from gateway.domain.model import HisAnswer
from gateway.domain.notifications import TOPICS, Notifications, Subscriptions
from gateway.domain.slot_book import SlotBook
from tests.unit.outer_gate import DAY, SCHEDULE, SID, TZ, appointment, outcome
from gateway.domain.model import SlotNotice

ENDPOINT = "https://hooks.demo.example/fhir-hook"


@pytest.fixture
def subs(gate):
    gate.chamber.on_unit(Notifications().after_unit)
    notify = {p: SimpleNamespace(endpoint=ENDPOINT if p == "demo" else f"https://{p}.example/hook",
                                 max_subscriptions=2) for p in ("demo", "other", "readonly")}
    gate.api.subscriptions = SubscriptionsApi(Subscriptions(gate.chamber), notify=notify, tz=TZ,
                                              json_limits=JsonLimits(32, 65536),
                                              focus_json=lambda platform, focus: {"resourceType": "Appointment",
                                                                                  "id": focus.split("/")[1]})
    return gate


def subscription(payload="id-only", **channel):
    return {"resourceType": "Subscription", "status": "requested", "reason": "my appointments",
            "criteria": TOPICS["appointment-status"],
            "channel": {"type": "rest-hook", "payload": "application/fhir+json",
                        "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": payload}]}, **channel}}


def test_a_platform_subscribes_with_its_configured_endpoint(subs):
    r = subs.request("POST", "/Subscription", subscription())
    assert r.status == 201, r.json
    assert r.json["status"] == "requested" and r.json["channel"]["endpoint"] == ENDPOINT  # (until its handshake)
    assert r.headers["location"] == f"https://gw.example/fhir/Subscription/{r.json['id']}"
    assert subs.request("GET", f"/Subscription/{r.json['id']}").json["criteria"] == TOPICS["appointment-status"]
    assert [e["resource"]["id"] for e in subs.request("GET", "/Subscription").json["entry"]] == [r.json["id"]]


def test_an_endpoint_from_the_request_is_refused_unless_it_is_the_configured_one(subs):
    outcome(subs.request("POST", "/Subscription", subscription(endpoint="https://169.254.169.254/x")),
            422, "business-rule")
    assert subs.request("POST", "/Subscription", subscription(endpoint=ENDPOINT)).status == 201


@pytest.mark.parametrize("change, expression", [
    (lambda s: s.update(end="2031-01-01T00:00:00Z"), "Subscription.end"),
    (lambda s: s["channel"].update(header=["Authorization: x"]), "Subscription.channel.header"),
    (lambda s: s["channel"].update(type="websocket"), "Subscription.channel.type"),
    (lambda s: s.update(criteria="Appointment?status=cancelled"), "Subscription.criteria"),
    (lambda s: s["channel"]["_payload"]["extension"][0].update(valueCode="everything"),
     "Subscription.channel._payload.extension.valueCode"),
    (lambda s: s["channel"].update(extension=[{"url": HEARTBEAT_PERIOD, "valueUnsignedInt": 1}]),
     "Subscription.channel.extension.valueUnsignedInt"),
    (lambda s: s["channel"].update(extension=[{"url": BACKPORT + "backport-timeout", "valueUnsignedInt": 30}]),
     "Subscription.channel.extension"),
])
def test_what_is_not_honoured_is_refused(subs, change, expression):
    body = subscription()
    change(body)
    r = subs.request("POST", "/Subscription", body)
    assert r.status == 422 and r.json["issue"][0]["expression"] == [expression], r.json
    assert subs.chamber.read().subscriptions_of("demo") == []


def test_a_platform_without_an_endpoint_or_the_topics_scope_cannot_subscribe(subs):
    outcome(subs.request("POST", "/Subscription", subscription(), platform="limited"), 422, "business-rule")
    outcome(subs.request("POST", "/Subscription", subscription(endpoint="https://readonly.example/hook"),
                         platform="readonly"), 403, "forbidden")


def test_the_platforms_limit_of_subscriptions(subs):
    for _ in range(2):
        assert subs.request("POST", "/Subscription", subscription()).status == 201
    outcome(subs.request("POST", "/Subscription", subscription()), 422, "too-costly")


def test_another_platforms_subscription_is_not_found(subs):
    sub_id = subs.request("POST", "/Subscription", subscription()).json["id"]
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/$status"), ("GET", "/$events")):
        outcome(subs.request(method, f"/Subscription/{sub_id}{path}", platform="other"), 404, "not-found")
    assert subs.chamber.read().subscription(sub_id).status == "active"


def test_deleted_subscriptions_get_no_more_notifications(subs):
    sub_id = subs.request("POST", "/Subscription", subscription()).json["id"]
    r = subs.request("DELETE", f"/Subscription/{sub_id}")
    assert r.status == 200 and r.json["status"] == "off"
    subs.request("POST", "/Appointment", appointment(SID[0]))
    assert subs.chamber.read().notifications_of(sub_id) == []


def test_events_catch_up_after_the_hospital_cancels(subs):
    """$events gives the notifications by number, with the focus (full-resource on request); $status the count."""
    sub_id = subs.request("POST", "/Subscription", subscription()).json["id"]
    booked = subs.request("POST", "/Appointment", appointment(SID[0]))
    appointment_id = booked.json["id"]
    message = subs.chamber.read().messages(direction="outbound")[0]
    subs.chamber.transact_now(lambda tx: subs.booking.on_answer(tx, tx.message(message.id), HisAnswer("AA", "", "H1")))
    subs.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [
        SlotNotice("free", SCHEDULE, DAY, 15, "card", "x", "H1")]))
    status = subs.request("GET", f"/Subscription/{sub_id}/$status").json
    params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert params["events-since-subscription-start"]["valueString"] == "2"
    assert params["type"]["valueCode"] == "query-status"
    events = subs.request("GET", f"/Subscription/{sub_id}/$events?eventsSinceNumber=2").json
    parameters = events["entry"][0]["resource"]["parameter"]
    notified = [p for p in parameters if p["name"] == "notification-event"]
    assert len(notified) == 1 and notified[0]["extension"][0]["valueCode"] == "cancelled"
    assert {"name": "focus", "valueReference": {"reference": f"https://gw.example/fhir/Appointment/{appointment_id}"}} \
        in notified[0]["part"]
    assert len(events["entry"]) == 1
    full = subs.request("GET", f"/Subscription/{sub_id}/$events?content=full-resource").json
    assert [e["resource"]["resourceType"] for e in full["entry"]] == ["Parameters", "Appointment"]
    outcome(subs.request("GET", f"/Subscription/{sub_id}/$events?eventsSinceNumber=x"), 400, "invalid")
    outcome(subs.request("GET", f"/Subscription/{sub_id}/$events?_since=2030"), 400, "not-supported")


def test_the_capability_statement_names_subscriptions(subs):
    entry = [r for r in subs.request("GET", "/metadata").json["rest"][0]["resource"] if r["type"] == "Subscription"]
    assert entry and {o["name"] for o in entry[0]["operation"]} == {"status", "events"}


def test_a_heartbeat_period_is_kept_and_shown_and_a_handshake_is_queued(subs):
    body = subscription()
    body["channel"]["extension"] = [{"url": HEARTBEAT_PERIOD, "valueUnsignedInt": 60}]
    r = subs.request("POST", "/Subscription", body)
    assert r.status == 201 and r.json["channel"]["extension"] == body["channel"]["extension"]
    row = subs.chamber.read().subscription(r.json["id"])
    assert row.heartbeat == 60 and row.events == 0
    (handshake,) = subs.chamber.read().notifications_of(row.id, first=0)
    assert (handshake.event, handshake.what, handshake.state) == (0, "handshake", "pending")
    bundle = subs.api.subscriptions.notification(row, handshake, "https://gw.example/fhir", 0.0)
    params = {p["name"]: p for p in bundle["entry"][0]["resource"]["parameter"]}
    assert params["type"]["valueCode"] == "handshake" and "notification-event" not in params
    heartbeat = subs.api.subscriptions.notification(row, None, "https://gw.example/fhir", 0.0)
    assert heartbeat["entry"][0]["resource"]["parameter"][3] == {"name": "type", "valueCode": "heartbeat"}


@pytest.fixture
def slot_subs(gate):
    """The Subscription endpoints with the domain's notifications and full-resource focus as the service wires
    them: the free-slot topic within the platforms' quotas (demo: 2 slots a day)."""
    gate.chamber.on_unit(Notifications(lambda: gate.quotas).after_unit)
    notify = {p: SimpleNamespace(endpoint=f"https://{p}.example/hook", max_subscriptions=2)
              for p in ("demo", "other", "readonly")}
    gate.api.subscriptions = SubscriptionsApi(
        Subscriptions(gate.chamber), notify=notify, tz=TZ, json_limits=JsonLimits(32, 65536),
        focus_json=lambda platform, focus: focus_resource(gate.chamber.read(), platform, focus, TZ, gate.quotas))
    return gate


def free_slot_subscription():
    return dict(subscription("full-resource"), criteria=TOPICS["free-slot"])


def test_the_free_slot_topic_offers_only_what_the_platforms_quota_lets_it_book(slot_subs):
    """demo books its 2 slots of the day: the other free slots are hidden from it (GET /Slot) and their blocking
    is not notified to it; another platform, not limited, hears of it with the Slot as GET /Slot/{id} shows it."""
    mine = slot_subs.request("POST", "/Subscription", free_slot_subscription()).json["id"]
    theirs = slot_subs.request("POST", "/Subscription", free_slot_subscription(), platform="other").json["id"]
    for sid in SID[:2]:
        assert slot_subs.request("POST", "/Appointment", appointment(sid)).status in (201, 202)
    assert slot_subs.request("GET", f"/Slot?_id={SID[5]}").json["total"] == 0  # hidden from demo
    slot_subs.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [
        SlotNotice("block", SCHEDULE, DAY + timedelta(minutes=15 * 5), 15, "card", "x")]))
    read = slot_subs.chamber.read()
    assert [(n.focus, n.what) for n in read.notifications_of(theirs)] == [
        (f"Slot/{SID[0]}", "taken"), (f"Slot/{SID[1]}", "taken"), (f"Slot/{SID[5]}", "blocked")]
    assert (f"Slot/{SID[5]}", "blocked") not in [(n.focus, n.what) for n in read.notifications_of(mine)]
    full = slot_subs.request("GET", f"/Subscription/{theirs}/$events?eventsSinceNumber=3", platform="other").json
    assert [e["resource"]["resourceType"] for e in full["entry"]] == ["Parameters", "Slot"]
    assert full["entry"][1]["resource"]["status"] == "busy-unavailable"
    # a free slot beyond demo's quota is not carried to it in full either
    assert focus_resource(read, "demo", f"Slot/{SID[6]}", TZ, slot_subs.quotas) is None
    assert focus_resource(read, "other", f"Slot/{SID[6]}", TZ, slot_subs.quotas)["status"] == "free"


def test_each_topic_needs_its_scope(slot_subs):
    """readonly holds Slot.read and Schedule.read: it may follow free slots, not appointments nor prescriptions."""
    r = slot_subs.request("POST", "/Subscription", free_slot_subscription(), platform="readonly")
    assert r.status == 201 and r.json["criteria"] == TOPICS["free-slot"]
    for topic in ("appointment-status", "prescription-status"):
        body = dict(free_slot_subscription(), criteria=TOPICS[topic])
        outcome(slot_subs.request("POST", "/Subscription", body, platform="readonly"), 403, "forbidden")
    # a subscription it holds from before its scope was withdrawn: its events are not served any more
    slot_subs.chamber.transact_now(lambda tx: tx.add_subscription(id="old", platform="readonly",
                                                                  topic="appointment-status", payload="id-only"))
    outcome(slot_subs.request("GET", "/Subscription/old/$events", platform="readonly"), 403, "forbidden")


def test_the_empty_payload_names_no_focus(subs):
    """payload content empty: a notification says only that something happened (event number, change); the
    platform asks $events (or searches) for what. Its handshake Bundle says status requested."""
    r = subs.request("POST", "/Subscription", subscription("empty"))
    assert r.status == 201 and r.json["channel"]["_payload"]["extension"][0]["valueCode"] == "empty"
    sub_id = r.json["id"]
    subs.request("POST", "/Appointment", appointment(SID[0]))
    message = subs.chamber.read().messages(direction="outbound")[0]
    subs.chamber.transact_now(lambda tx: subs.booking.on_answer(tx, tx.message(message.id), HisAnswer("AA", "", "H1")))
    reader = subs.chamber.read()
    row, n = reader.subscription(sub_id), reader.notifications_of(sub_id)[0]
    bundle = subs.api.subscriptions.notification(row, n, "https://gw.example/fhir", 0.0)
    event = [p for p in bundle["entry"][0]["resource"]["parameter"] if p["name"] == "notification-event"][0]
    assert [p["name"] for p in event["part"]] == ["event-number", "timestamp"] and len(bundle["entry"]) == 1
    handshake = subs.api.subscriptions.notification(row, reader.notification(sub_id, 0), "https://gw.example/fhir", 0)
    params = {p["name"]: p for p in handshake["entry"][0]["resource"]["parameter"]}
    assert params["type"]["valueCode"] == "handshake" and params["status"]["valueCode"] == "requested"
