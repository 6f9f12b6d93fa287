"""What the hospital's changes owe the platforms that subscribed to them (issue 23, docs/subscriptions.md).

A platform subscribes to a *topic* (FHIR Subscriptions R5 Backport for R4); this module decides which change is
an event of which topic and for whom, and writes each subscription's notification into the chamber **inside the
unit of work that made the change** (:meth:`Notifications.after_unit`, run by the chamber at the end of every
unit: ``Chamber.on_unit``).  So a notification exists if and only if its change was committed, and none is lost
when the process dies after COMMIT: the outer gate delivers what is pending (adapters/outer/delivery.py).

Topics:

- ``appointment-status`` — a platform's own appointments changed status: booked (at the HIS, e.g. after a 202),
  cancelled (by the hospital: a suspended clinic; by the platform; a move's old booking), refused, moved to
  another slot by the hospital, or marked a no-show by the HIS.  Only the platform that booked the appointment
  is notified (its subscriptions to the topic), as only it can read that appointment.
- ``free-slot`` — a slot became free (released or opened by the HIS, freed by a cancellation, a hold given
  back) or stopped being free (blocked, taken at the counter, held or booked by a platform).  Each subscribing
  platform is told only of a slot it is shown as free before or after the change, exactly as ``GET /Slot``
  shows slots (free, not started, within its quota: :meth:`gateway.domain.quota.Quotas.may_book`).
- ``prescription-status`` — the platform's prescriptions: each item accepted (active) or refused by the
  hospital pharmacy, not delivered (cancelled), dispensed, completed.  Only the prescribing platform.

A notification carries the resource it is about (``Appointment/<id>``) and what happened (``cancelled``,
``moved``...) — never a patient's name or identifier.  Each subscription numbers its notifications 1, 2, ...
(eventsSinceSubscriptionStart), so a platform sees a gap and asks ``$events``.
"""

from __future__ import annotations

import structlog

log = structlog.get_logger("gateway.domain.notifications")

#: topic code -> its canonical URL (Subscription.criteria / SubscriptionTopic.url)
TOPIC_BASE = "https://gatewayd.invalid/fhir/SubscriptionTopic/"
TOPICS = {code: TOPIC_BASE + code for code in ("appointment-status", "free-slot", "prescription-status")}
#: what a topic's subscriber needs to read its focus (the platform's scopes)
TOPIC_SCOPES = {"appointment-status": "Appointment.read", "free-slot": "Slot.read",
                "prescription-status": "MedicationRequest.read"}
#: payload kinds (Subscription.channel.payload's content extension): ``empty`` names no focus at all (the platform
#: asks $events), ``id-only`` its reference, ``full-resource`` also the resource
PAYLOADS = ("empty", "id-only", "full-resource")
#: the heartbeat periods a platform may ask for (seconds): none shorter, so heartbeats cost little
HEARTBEAT_RANGE = (10, 86400)


def topic_code(url: str) -> str | None:
    """The topic a canonical URL names, or None for one the gateway does not offer."""
    for code, canonical in TOPICS.items():
        if url == canonical:
            return code
    return None


def appointment_change(before: tuple[str, str], after) -> str | None:
    """What happened to an appointment between ``before`` ((status, slot id) before the unit) and ``after`` (its
    row now), as a notification says it; None when nothing a subscriber is told about changed (a hold's
    pending change, its outcome text)."""
    status, slot_id = before
    if after is None:
        return None
    if after.status != status:
        return after.status  # booked | cancelled | refused (pending -> pending never differs)
    if after.status == "booked" and after.slot_id != slot_id:
        return "moved"
    return None


def note(tx, appointment_id: str, what: str) -> None:
    """Note an event of an appointment that changes no status of it (the HIS's no-show): notified at the end of
    the unit like a status change."""
    tx.appointment_events.append((appointment_id, what))


def note_prescription(tx, prescription_id: str, request_id: str, what: str) -> None:
    """Note a change of a prescription's item (MedicationRequest ``request_id``): ``active``, ``refused``,
    ``cancelled``, ``dispensed``, ``completed``; notified at the end of the unit to the prescribing platform."""
    if tx.prescription_events is not None:
        tx.prescription_events.append((prescription_id, f"MedicationRequest/{request_id}", what))


def slot_change(shown_before: bool, row) -> str | None:
    """What a platform is told of a slot it was shown as free before a change (``shown_before``) and whose row
    is ``row`` now — ``free`` when it is offered now, else ``blocked``, ``taken`` (held or booked) or
    ``removed`` — or None when it was not offered before and is not now (nothing it saw changed)."""
    from gateway.domain.model import slot_status

    if row is None:
        return "removed" if shown_before else None
    status = slot_status(row)
    return "blocked" if status == "busy-unavailable" else "taken"


class Notifications:
    """Writes the notifications a unit of work's changes owe (``Chamber.on_unit(notifications.after_unit)``);
    ``quotas()``: the platforms' slot quotas now (gateway.domain.quota.Quotas, None: no one is limited)."""

    def __init__(self, quotas=None):
        self.quotas = quotas or (lambda: None)

    def shown(self, tx, platform: str, row) -> bool:
        """Whether ``platform`` is shown slot ``row`` as free (GET /Slot's rule), with the quotas' counts now."""
        from gateway.domain.model import slot_status

        if row is None or slot_status(row) != "free" or row.start_ts <= tx.now:
            return False
        quotas = self.quotas()
        return quotas is None or quotas.may_book(tx, platform, row, tx.now)

    def after_unit(self, tx) -> None:
        if tx.slots_before:
            self._slots(tx)
        if tx.prescription_events:
            self._prescriptions(tx)
        before = tx.appointments_before
        if not before and not tx.appointment_events:
            return
        events: list[tuple[object, str]] = []
        for appointment_id, was in (before or {}).items():
            appt = tx.appointment(appointment_id)
            what = appointment_change(was, appt)
            if what is not None:
                events.append((appt, what))
        for appointment_id, what in tx.appointment_events:
            appt = tx.appointment(appointment_id)
            if appt is not None:
                events.append((appt, what))
        for appt, what in events:
            for sub in tx.subscriptions_of(appt.platform, "appointment-status"):
                tx.add_notification(sub.id, platform=appt.platform, focus=f"Appointment/{appt.id}", what=what)

    def _slots(self, tx) -> None:
        """The free-slot topic: each subscription hears of a slot of this unit whose offer to its platform
        changed (free before or now, as GET /Slot shows it to that platform)."""
        subs = tx.subscriptions_to("free-slot")
        if not subs:
            return
        for slot_id, was in tx.slots_before.items():
            row = tx.slot(slot_id)
            for sub in subs:
                before, after = self.shown(tx, sub.platform, was), self.shown(tx, sub.platform, row)
                if before == after:
                    continue  # not offered before nor now, or offered still (a time, a text changed)
                what = "free" if after else slot_change(before, row)
                tx.add_notification(sub.id, platform=sub.platform, focus=f"Slot/{slot_id}", what=what)

    def _prescriptions(self, tx) -> None:
        """The prescription-status topic: the prescribing platform's subscriptions hear of its items' changes."""
        if "prescription-status" not in tx.subscribed_topics():
            return
        platforms: dict[str, str] = {}
        for prescription_id, focus, what in tx.prescription_events:
            if prescription_id not in platforms:
                p = tx.prescription(prescription_id)
                platforms[prescription_id] = p.platform if p is not None and p.direction == "to_his" else ""
            if platforms[prescription_id]:
                for sub in tx.subscriptions_of(platforms[prescription_id], "prescription-status"):
                    tx.add_notification(sub.id, platform=sub.platform, focus=focus, what=what)


def subscription_status(reader, row) -> str:
    """A subscription's status as FHIR says it (Backport IG): ``off`` once ended; ``requested`` until its
    handshake (event 0) is answered with a 2xx, then ``active``; ``error`` when the handshake failed (an attempt
    did, while it is retried; or it is dead) — ``active`` again once the endpoint has taken an event after it.
    The chamber keeps only active/off: the rest is read from the handshake's notification."""
    if row.status != "active":
        return row.status
    handshake = reader.notification(row.id, 0)
    if handshake is None or handshake.state == "delivered":  # (a delivered one is pruned in time)
        return "active"
    if handshake.state == "pending" and handshake.attempts == 0:
        return "requested"
    if handshake.state == "dead" and row.events > 0:
        latest = reader.notification(row.id, row.events)
        if latest is None or latest.state == "delivered":
            return "active"
    return "error"


def notify_released(tx, quotas, since: float, until: float) -> int:
    """The free-slot topic's time-based release: a free slot a limited platform's quota hid from it (its
    allowance of that schedule and day used up) is offered to it once it starts within the rule's
    ``release_before`` — at an instant in (``since``, ``until``], when nothing is committed.  Each such slot is
    notified ``free`` to the platform's free-slot subscriptions, inside ``tx``; returns how many."""
    if quotas is None:
        return 0
    count = 0
    for sub in tx.subscriptions_to("free-slot"):
        for period in sorted(quotas.release_periods(sub.platform)):
            for slot in tx.free_slots_starting(since + period, until + period):
                rule = quotas.rule_for(sub.platform, slot.schedule_id)
                if (rule is None or rule.release_before != period or slot.start_ts <= tx.now
                        or not quotas.used_up(tx, sub.platform, slot)):
                    continue  # (offered before its release already, or not by this rule)
                tx.add_notification(sub.id, platform=sub.platform, focus=f"Slot/{slot.id}", what="free")
                count += 1
    return count


def withdraw(tx, granted: dict[str, frozenset]) -> list[tuple[str, str, str, int]]:
    """End what the hospital's configuration no longer allows, inside ``tx``: ``granted`` maps each platform with a
    ``notify`` endpoint to its scopes.  A subscription whose platform has no endpoint any more (or is gone), or
    lacks its topic's scope, is ended (``off``) and its pending notifications are dead-lettered with the reason —
    never kept pending, never sent.  Returns (platform, subscription id, reason, notifications dead-lettered)."""
    out = []
    for sub in tx.subscriptions_open():
        scopes = granted.get(sub.platform)
        if scopes is None:
            reason = f"platform {sub.platform!r} has no notify endpoint in the configuration any more"
        elif TOPIC_SCOPES[sub.topic] not in scopes:
            reason = f"platform {sub.platform!r} is no longer granted the scope {TOPIC_SCOPES[sub.topic]}"
        else:
            continue
        if sub.status == "active":
            tx.end_subscription(sub.id)
        out.append((sub.platform, sub.id, reason, tx.dead_letter_pending(sub.id, reason)))
    return out


class SubscriptionRefused(Exception):
    """A subscription the gateway does not take (the platform has too many already)."""


class Subscriptions:
    """A platform's subscriptions in the chamber: taken within the platform's limit, ended, read."""

    def __init__(self, chamber):
        self.chamber = chamber

    def subscribe(self, platform: str, topic: str, payload: str, max_count: int, heartbeat: float | None = None):
        """A new active subscription of ``platform`` (Deferred -> its row), its handshake queued first (event 0);
        ``heartbeat``: seconds without a delivery after which a heartbeat is sent.  SubscriptionRefused past
        ``max_count`` active ones."""
        from gateway.domain.ids import new_id

        def work(tx):
            if len(tx.subscriptions_of(platform)) >= max_count:
                raise SubscriptionRefused(f"the platform holds {max_count} subscriptions already (its limit): "
                                          f"delete one first")
            sub_id = new_id("s")
            tx.add_subscription(id=sub_id, platform=platform, topic=topic, payload=payload, heartbeat=heartbeat,
                                handshake=True)
            return tx.subscription(sub_id)

        return self.chamber.transact(work)

    def unsubscribe(self, platform: str, subscription_id: str):
        """End the platform's own subscription (Deferred -> its row, None when it has no such subscription).
        Notifications already committed are still delivered."""
        def work(tx):
            row = tx.subscription(subscription_id)
            if row is None or row.platform != platform:
                return None
            tx.end_subscription(subscription_id)
            return tx.subscription(subscription_id)

        return self.chamber.transact(work)

    def withdraw(self, granted: dict[str, frozenset]):
        """:func:`withdraw` in a unit of its own (at the outer gate's start and on every reload); each
        subscription ended is logged (``notify.withdrawn``: platform, subscription, reason, how many
        notifications were dead-lettered).  Deferred -> the list."""
        def logged(ended):
            for platform, sub_id, reason, dead in ended:
                log.warning("notify.withdrawn", platform=platform, subscription=sub_id, reason=reason,
                            dead_lettered=dead)
            return ended

        return self.chamber.transact(lambda tx: withdraw(tx, granted)).addCallback(logged)

    def own(self, platform: str, subscription_id: str):
        """The platform's subscription (None: not its own, or unknown)."""
        row = self.chamber.read().subscription(subscription_id)
        return row if row is not None and row.platform == platform else None
