"""FHIR Subscriptions R5 Backport for R4 (http://hl7.org/fhir/uv/subscriptions-backport), the parts the gateway
offers (docs/subscriptions.md): a platform's Subscription read into (topic, payload) — with every element the
gateway would not honour refused, never ignored — and the gateway's own JSON: the Subscription as stored, the
notification Bundle (history) with its SubscriptionStatus (Parameters) first, for deliveries, ``$status`` and
``$events``.  Pure: no Twisted, no chamber."""

from __future__ import annotations

from typing import Any

from adapters.maps.fhir_scheduling import InvalidResource
from gateway.domain.notifications import HEARTBEAT_RANGE, PAYLOADS, TOPICS, topic_code

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
SUBSCRIPTION_PROFILE = BACKPORT + "backport-subscription"
STATUS_PROFILE = BACKPORT + "backport-subscription-status-r4"
PAYLOAD_CONTENT = BACKPORT + "backport-payload-content"
HEARTBEAT_PERIOD = BACKPORT + "backport-heartbeat-period"
#: the gateway's extension on a notification-event: what changed (booked, cancelled, refused, moved, noshow)
CHANGE_EXTENSION = "https://gatewayd.invalid/fhir/StructureDefinition/notification-change"
FHIR_JSON = "application/fhir+json"

_TOP = {"resourceType", "meta", "status", "reason", "criteria", "channel", "text"}
_CHANNEL = {"type", "endpoint", "payload", "_payload", "extension"}


def _refuse(diagnostics: str, expression: str, status: int = 422, code: str = "not-supported"):
    raise InvalidResource([(code, diagnostics, expression)], status=status)


def read_subscription(body: Any, endpoint: str) -> tuple[str, str, float | None]:
    """(topic code, payload kind, heartbeat period or None) of a platform's Subscription; ``endpoint`` is the
    platform's configured one, the only one a Subscription may name.  InvalidResource (400 malformed, 422 not
    offered) otherwise."""
    if not isinstance(body, dict) or body.get("resourceType") != "Subscription":
        _refuse("expected a Subscription", "Subscription", 400, "invalid")
    for key in sorted(set(body) - _TOP):
        _refuse(f"Subscription.{key} is not supported here (nothing is ignored: leave it out)",
                f"Subscription.{key}")
    if body.get("status", "requested") not in ("requested", "active"):
        _refuse("a new Subscription's status is requested (or active)", "Subscription.status", 422, "invalid")
    criteria = body.get("criteria")
    if not isinstance(criteria, str) or topic_code(criteria) is None:
        _refuse(f"criteria must be a topic this gateway offers: {', '.join(TOPICS.values())}",
                "Subscription.criteria")
    channel = body.get("channel")
    if not isinstance(channel, dict):
        _refuse("channel is required", "Subscription.channel", 400, "required")
    for key in sorted(set(channel) - _CHANNEL):
        _refuse(f"Subscription.channel.{key} is not supported here (nothing is ignored: leave it out)",
                f"Subscription.channel.{key}")
    if channel.get("type") != "rest-hook":
        _refuse("channel.type must be rest-hook", "Subscription.channel.type")
    if "endpoint" in channel and channel["endpoint"] != endpoint:
        _refuse("channel.endpoint is the platform's own from the hospital's configuration; leave it out or give "
                "exactly that URL", "Subscription.channel.endpoint", 422, "business-rule")
    if channel.get("payload", FHIR_JSON) != FHIR_JSON:
        _refuse(f"channel.payload must be {FHIR_JSON}", "Subscription.channel.payload")
    content = "id-only"
    extensions = (channel.get("_payload") or {}).get("extension", []) if isinstance(channel.get("_payload"), dict) \
        else None
    if extensions is None or not isinstance(extensions, list) or set(channel.get("_payload")) - {"extension"}:
        _refuse("channel._payload holds only the backport-payload-content extension", "Subscription.channel._payload")
    for ext in extensions:
        if not isinstance(ext, dict) or ext.get("url") != PAYLOAD_CONTENT:
            _refuse("channel._payload holds only the backport-payload-content extension",
                    "Subscription.channel._payload.extension")
        content = ext.get("valueCode")
        if content not in PAYLOADS:
            _refuse(f"payload content must be one of {', '.join(PAYLOADS)}",
                    "Subscription.channel._payload.extension.valueCode")
    return topic_code(criteria), content, _heartbeat(channel.get("extension", []))


def _heartbeat(extensions: Any) -> float | None:
    """The channel's backport-heartbeat-period (seconds), the only channel extension honoured."""
    if not isinstance(extensions, list):
        _refuse("channel.extension must be a list", "Subscription.channel.extension", 400, "invalid")
    period = None
    low, high = HEARTBEAT_RANGE
    for ext in extensions:
        if not isinstance(ext, dict) or ext.get("url") != HEARTBEAT_PERIOD or period is not None:
            _refuse("of the channel's extensions only one backport-heartbeat-period is supported (nothing is "
                    "ignored: leave the others out)", "Subscription.channel.extension")
        period = ext.get("valueUnsignedInt")
        if not isinstance(period, int) or isinstance(period, bool) or not low <= period <= high:
            _refuse(f"the heartbeat period is a whole number of seconds from {low} to {high}",
                    "Subscription.channel.extension.valueUnsignedInt")
    return float(period) if period is not None else None


def subscription_resource(row, endpoint: str | None, instant) -> dict:
    """The stored subscription ``row`` as a Subscription; ``instant(ts)`` writes a timestamp."""
    return {
        "resourceType": "Subscription",
        "id": row.id,
        "meta": {"lastUpdated": instant(row.updated), "profile": [SUBSCRIPTION_PROFILE]},
        "status": row.status,
        "reason": f"{row.topic} notifications",
        "criteria": TOPICS[row.topic],
        "channel": {"type": "rest-hook", **({"endpoint": endpoint} if endpoint else {}), "payload": FHIR_JSON,
                    "_payload": {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": row.payload}]},
                    **({"extension": [{"url": HEARTBEAT_PERIOD, "valueUnsignedInt": int(row.heartbeat)}]}
                       if row.heartbeat else {})},
    }


def status_parameters(row, base: str, kind: str, events: list, instant) -> dict:
    """The SubscriptionStatus (R4: Parameters) of ``row`` for a Bundle of ``kind`` (handshake, heartbeat,
    event-notification, query-status, query-event) naming the notification rows ``events``."""
    parameters: list[dict] = [
        {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{row.id}"}},
        {"name": "topic", "valueCanonical": TOPICS[row.topic]},
        {"name": "status", "valueCode": row.status},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(row.events)},
    ]
    for n in events:
        part = [{"name": "event-number", "valueString": str(n.event)},
                {"name": "timestamp", "valueInstant": instant(n.created)}]
        if row.payload != "empty":
            part.append({"name": "focus", "valueReference": {"reference": f"{base}/{n.focus}"}})
        parameters.append({"name": "notification-event", "part": part,
                           "extension": [{"url": CHANGE_EXTENSION, "valueCode": n.what}]})
    return {"resourceType": "Parameters", "meta": {"profile": [STATUS_PROFILE]}, "parameter": parameters}


def notification_bundle(row, base: str, kind: str, events: list, instant, resources: dict | None = None,
                        bundle_id: str | None = None, now: float | None = None) -> dict:
    """A notification Bundle (type history): the SubscriptionStatus first, then — full-resource — each event's
    focus as it is now (``resources``: focus 'Type/id' -> resource, absent when it is gone)."""
    status = status_parameters(row, base, kind, events, instant)
    entries = [{"fullUrl": f"urn:uuid:{bundle_id}" if bundle_id else f"{base}/Subscription/{row.id}/$status",
                "resource": status,
                "request": {"method": "GET", "url": f"Subscription/{row.id}/$status"},
                "response": {"status": "200"}}]
    for focus in dict.fromkeys(n.focus for n in events):
        resource = (resources or {}).get(focus)
        if resource is not None:
            entries.append({"fullUrl": f"{base}/{focus}", "resource": resource,
                            "request": {"method": "PUT", "url": focus}, "response": {"status": "200"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "entry": entries}
    if bundle_id:
        bundle["id"] = bundle_id
    if now is not None:
        bundle["timestamp"] = instant(now)
    return bundle
