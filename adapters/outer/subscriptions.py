"""The outer gate's Subscription endpoints (FHIR Subscriptions R5 Backport for R4, docs/subscriptions.md): thin
HTTP handling over :class:`gateway.domain.notifications.Subscriptions`; the JSON is
:mod:`adapters.maps.fhir_subscriptions`'s.

- ``POST /Subscription``: a rest-hook subscription to a topic the gateway offers, empty, id-only or full-resource; the
  endpoint is the platform's ``platforms[].notify.endpoint`` (none in the YAML: 422; another in the request: 422,
  never used); the topic's scope is needed (``appointment-status``: Appointment.read).  201, active.
- ``GET /Subscription`` (the platform's own active ones), ``GET /Subscription/{id}``, ``DELETE /Subscription/{id}``
  (status off: no new notifications; those committed are still delivered).
- ``GET /Subscription/{id}/$status``: a query-status Bundle; ``GET /Subscription/{id}/$events?eventsSinceNumber=
  &eventsUntilNumber=``: a query-event Bundle with those notifications (at most 100), so a platform that saw a gap
  in the event numbers, or whose endpoint was down, catches up.
Another platform's subscription is 404, as one that does not exist.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from zoneinfo import ZoneInfo

from adapters.maps.fhir_scheduling import appointment_resource, slot_resource
from adapters.maps.fhir_subscriptions import (SUBSCRIPTION_PROFILE, notification_bundle, read_subscription,
                                             subscription_resource)
from adapters.outer.access import require_scope
from adapters.outer.errors import FhirError
from adapters.outer.intake import JsonLimits, json_body, require_method
from gateway.domain.model import slot_status
from gateway.domain.notifications import TOPIC_SCOPES, SubscriptionRefused, Subscriptions, subscription_status

#: most notifications one $events answer carries
EVENTS_PAGE = 100


class SubscriptionsApi:
    """The Subscription handlers over ``subscriptions``; ``notify``: platform name -> its NotifyConfig (a reload
    replaces it); ``focus_json(focus)``: the resource a full-resource notification carries (None: gone)."""

    def __init__(self, subscriptions: Subscriptions, *, notify: dict, tz: ZoneInfo, json_limits: JsonLimits,
                 focus_json):
        self.subs = subscriptions
        self.notify = notify
        self.tz = tz
        self.json_limits = json_limits
        self.focus_json = focus_json

    def instant(self, ts: float) -> str:
        return datetime.fromtimestamp(ts, self.tz).isoformat(timespec="milliseconds")

    def handler(self, parts, method, grant, platform, request, query, base, access):
        access.resource_type = "Subscription"
        rest = parts[1:]
        if not rest:
            require_method(method, "GET", "POST")
            if method == "POST":
                access.action = "subscribe"
                return lambda: self._create(platform, grant, request, base)
            _no_params(query, set())
            access.action = "search"
            return lambda: self._search(platform, base)
        access.resource_id = rest[0]
        if len(rest) == 2 and rest[1] in ("$status", "$events"):
            require_method(method, "GET", "POST")
            access.action = "read"
            if rest[1] == "$status":
                _no_params(query, set())
                return lambda: self._status(platform, rest[0], base)
            _no_params(query, {"eventsSinceNumber", "eventsUntilNumber", "content"})
            return lambda: self._events(platform, rest[0], query, base, grant, access)
        if len(rest) > 1:
            raise FhirError(404, "not-supported", "no such Subscription operation (offered: $status, $events)")
        require_method(method, "GET", "DELETE")
        access.action = "read" if method == "GET" else "unsubscribe"
        if method == "DELETE":
            return lambda: self._delete(platform, rest[0], base)
        _no_params(query, set())
        return lambda: self._read(platform, rest[0], base)

    def shown(self, row):
        """The stored subscription ``row`` with its status as FHIR says it (requested, active, error, off)."""
        return dataclasses.replace(row, status=subscription_status(self.subs.chamber.read(), row))

    def notification(self, row, n, base: str, now: float) -> dict:
        """The Bundle that delivers notification ``n`` of subscription ``row`` (adapters/outer/delivery.py): its
        handshake (event 0, status requested), an event, or — ``n`` None — a heartbeat."""
        if n is None or n.what == "handshake":
            kind = "heartbeat" if n is None else "handshake"
            row = dataclasses.replace(row, status="requested") if n is not None else self.shown(row)
            return notification_bundle(row, base, kind, [], self.instant, bundle_id=f"{row.id}-{kind}-{now:.0f}",
                                       now=now)
        row = dataclasses.replace(row, status="active") if row.status == "active" else row  # (being delivered)
        resources = None
        if row.payload == "full-resource":
            resources = {n.focus: self.focus_json(row.platform, n.focus)}
        return notification_bundle(row, base, "event-notification", [n], self.instant, resources,
                                   bundle_id=f"{row.id}-{n.event}", now=now)

    def _endpoint(self, platform: str) -> str | None:
        cfg = self.notify.get(platform)
        return cfg.endpoint if cfg is not None else None

    async def _create(self, platform, grant, request, base):
        cfg = self.notify.get(platform)
        if cfg is None:
            raise FhirError(422, "business-rule", f"platform {platform!r} has no notification endpoint in the "
                                                  f"hospital's configuration (platforms[].notify): it cannot subscribe")
        topic, payload, heartbeat = read_subscription(json_body(request, self.json_limits), cfg.endpoint)
        require_scope(grant, platform, TOPIC_SCOPES[topic])
        try:
            row = await self.subs.subscribe(platform, topic, payload, cfg.max_subscriptions, heartbeat)
        except SubscriptionRefused as e:
            raise FhirError(422, "too-costly", str(e)) from None
        return 201, subscription_resource(self.shown(row), cfg.endpoint, self.instant), \
            {"Location": f"{base}/Subscription/{row.id}"}

    def _search(self, platform, base):
        rows = self.subs.chamber.read().subscriptions_of(platform)
        endpoint = self._endpoint(platform)
        entries = [{"fullUrl": f"{base}/Subscription/{r.id}",
                    "resource": subscription_resource(self.shown(r), endpoint, self.instant),
                    "search": {"mode": "match"}}
                   for r in rows]
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}, {}

    def _own(self, platform, subscription_id):
        row = self.subs.own(platform, subscription_id)
        if row is None:
            raise FhirError(404, "not-found", f"no Subscription {subscription_id!r}")
        return row

    def _read(self, platform, subscription_id, base):
        return 200, subscription_resource(self.shown(self._own(platform, subscription_id)),
                                          self._endpoint(platform), self.instant), {}

    async def _delete(self, platform, subscription_id, base):
        row = await self.subs.unsubscribe(platform, subscription_id)
        if row is None:
            raise FhirError(404, "not-found", f"no Subscription {subscription_id!r}")
        return 200, subscription_resource(row, self._endpoint(platform), self.instant), {}

    def _status(self, platform, subscription_id, base):
        row = self.shown(self._own(platform, subscription_id))
        return 200, notification_bundle(row, base, "query-status", [], self.instant), {}

    def _events(self, platform, subscription_id, query, base, grant, access):
        row = self._own(platform, subscription_id)
        first = _number(query, "eventsSinceNumber", 1)
        last = _number(query, "eventsUntilNumber", row.events)
        content = (query.get("content") or [row.payload])[-1]
        if content not in ("id-only", "full-resource", "empty"):
            raise FhirError(400, "invalid", "content must be empty, id-only or full-resource", expression="content")
        require_scope(grant, platform, TOPIC_SCOPES[row.topic])  # (a scope withdrawn: its events are not served)
        events = self.subs.chamber.read().notifications_of(row.id, first, last, EVENTS_PAGE)
        resources = None
        if content == "full-resource":
            access.patient_data = True
            resources = {f: self.focus_json(platform, f) for f in dict.fromkeys(n.focus for n in events)}
        shown = dataclasses.replace(self.shown(row), payload=content)
        return 200, notification_bundle(shown, base, "query-event", events, self.instant, resources), {}


def focus_resource(reader, platform: str, focus: str, tz: ZoneInfo, quotas) -> dict | None:
    """The resource ``focus`` ('Type/id') as ``platform`` reads it now, for a full-resource notification; None
    when it is gone or not the platform's to read: an appointment or a prescription item of another platform, a
    free slot its quota does not let it book (hidden from it as GET /Slot/{id} hides it)."""
    rtype, _, rid = focus.partition("/")
    if rtype == "Appointment":
        appt = reader.appointment(rid)
        if appt is None or appt.platform != platform:
            return None
        return appointment_resource(appt, reader.slot(appt.slot_id), tz, reader.appointment_identifiers(appt.id))
    if rtype == "Slot":
        slot = reader.slot(rid)
        if slot is None or (slot_status(slot) == "free" and quotas is not None
                            and not quotas.may_book(reader, platform, slot, reader.now)):
            return None
        return slot_resource(slot, tz)
    if rtype == "MedicationRequest":
        item = reader.medication_request(rid)
        p = reader.prescription(item.prescription_id) if item is not None else None
        if p is None or p.direction != "to_his" or p.platform != platform:
            return None
        return json.loads(item.resource)
    return None


def _no_params(query, allowed: set[str]) -> None:
    for key in query:
        if key not in allowed:
            raise FhirError(400, "not-supported", f"parameter {key!r} is not supported here", expression=key)


def _number(query, name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        n = int(values[-1])
    except ValueError:
        n = -1
    if n < 0:
        raise FhirError(400, "invalid", f"{name} must be a whole number", expression=name)
    return n


def capability_entry() -> dict:
    """The CapabilityStatement's Subscription entry (adapters/outer/capability.py)."""
    from gateway.domain.notifications import TOPICS

    return {"type": "Subscription", "supportedProfile": [SUBSCRIPTION_PROFILE],
            "interaction": [{"code": "create"}, {"code": "read"}, {"code": "delete"}, {"code": "search-type"}],
            "documentation": "FHIR Subscriptions R5 Backport (R4): rest-hook to the platform's endpoint in the "
                             "hospital's configuration only, empty, id-only or full-resource. Topics: "
                             + ", ".join(TOPICS.values()) + ". Deliveries are signed (X-Gatewayd-Signature, a "
                             "detached JWS) and numbered per subscription.",
            "operation": [{"name": "status", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/"
                                                           "OperationDefinition/backport-subscription-status"},
                          {"name": "events", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/"
                                                           "OperationDefinition/backport-subscription-events"}]}
